"""Data sets and the device-resident input pipeline.

This module holds two things:

1. Loading. `load_dataset(data_config)` returns `Splits`: uint8 NHWC train/test images,
   int32 labels and a `DatasetInfo` (class count, image shape, per-channel mean/std that
   the models use to normalize). Sources (`data.source`):

   * 'digits': scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline),
     with a fixed stratified 1,437 / 360 train/test split (test fraction 0.2, seed 0;
     `data.test_fraction` and `data.split_seed` do not change it).
   * 'npz': a local `.npz` file at `data.path`, either one pool (`images`, `labels`) split
     stratified by `data.test_fraction` / `data.split_seed`, or presplit
     (`train_images`, `train_labels`, `test_images`, `test_labels`).
   * 'tfds': a TFDS data set (`TFDS_NAMES`) read with `tfds.data_source` (array_record,
     random access; reading needs no TensorFlow, preparing it once does; see
     scripts/prepare_tfds.py).
   * 'fake': deterministic random images for tests of other modules (learnable: each
     class has its own prototype image).

   `data.num_train` / `data.num_test` (0 = all) then keep a deterministic, stratified
   subset (seeded by `data.split_seed`) of each split. The split and subset orderings use
   a small integer hash of (seed, index), not a library RNG, so they are identical on
   every machine and numpy version.

2. The input pipeline, pure functions meant to run inside `jax.jit` with the whole data
   set resident on the device: `epoch_permutation`, `train_batch` (gather + augment),
   `augment`, `to_float`, `steps_per_epoch`, and `eval_batches` (fixed-shape, masked).

Images stay uint8 until a batch is formed; models receive float32 in [0, 1] and
normalize themselves with `DatasetInfo.mean` / `std`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
import re
import socket
import urllib.error
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ('digits', 'npz', 'tfds', 'fake')
TFDS_NAMES = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn_cropped', 'stl10')

# Fields of the `data` config section and the values used when a field is absent.
# Unknown fields are rejected (a typo such as `num_trian` must not be ignored).
DEFAULTS = {
    'source': 'digits',
    'name': '',
    'path': '',
    'data_dir': '',
    'download': True,
    'test_fraction': 0.2,
    'split_seed': 0,
    'num_train': 0,
    'num_test': 0,
    'fake_shape': (8, 8, 1),
    'fake_num_classes': 10,
    'fake_num_train': 256,
    'fake_num_test': 64,
}

# The digits split is part of the data set's definition, so results are comparable.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# Widely used per-channel statistics of the training splits, in [0, 1] pixel units.
# svhn_cropped and stl10 are not listed: their statistics are computed from the loaded
# training images, like for 'digits', 'npz' and 'fake'.
_TFDS_STATS = {
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Every listed TFDS data set has these splits and features (svhn_cropped's 'extra' and
# stl10's 'unlabelled' splits are not used).
_TFDS_SPLITS = ('train', 'test')
_TFDS_IMAGE_KEY = 'image'
_TFDS_LABEL_KEY = 'label'

_NPZ_POOL_KEYS = ('images', 'labels')
_NPZ_PRESPLIT_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')

_PREPARE_HINT = (
    'Run once, on a machine with network access:\n'
    # tensorflow-datasets 4.9.10 imports importlib_resources when it downloads, without
    # declaring it as a dependency on Python >= 3.9.
    '  pip install tensorflow-cpu importlib_resources\n'
    '  python scripts/prepare_tfds.py --name={name} --data_dir={data_dir}\n'
    'and then point data.data_dir at that directory (copy it here if needed); '
    "or use data.source='npz' with a local .npz file.")


class DataUnavailableError(RuntimeError):
  """A TFDS data set is not prepared and cannot be prepared here (offline, no TensorFlow)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a loaded data set.

  Attributes:
    name: The data set's name (TFDS name, or the config's label for npz/fake).
    num_classes: Number of classes; labels lie in [0, num_classes).
    image_shape: (H, W, C) of one image.
    num_train: Number of training examples returned (after any `data.num_train` subset).
    num_test: Number of test examples returned (after any `data.num_test` subset).
    mean: Per-channel mean, length C, in [0, 1] pixel units: the standard values for
      mnist, fashion_mnist, cifar10 and cifar100 from TFDS, otherwise computed from the
      returned training images.
    std: Per-channel (population) standard deviation, length C, same units and origin.
    class_names: One name per class, or None when the source has none.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """Train and test splits held in host memory (arrays are read-only).

  Attributes:
    train_images: uint8 [N_train, H, W, C], values 0..255.
    train_labels: int32 [N_train], values in [0, info.num_classes).
    test_images: uint8 [N_test, H, W, C].
    test_labels: int32 [N_test].
    info: The data set's `DatasetInfo`.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  info: DatasetInfo


# --------------------------------------------------------------------------------------
# Config access and validation.


def _get(data_config, field: str):
  """Reads `field` from a ConfigDict, attribute object or mapping; absent -> DEFAULTS."""
  if isinstance(data_config, collections.abc.Mapping):
    return data_config.get(field, DEFAULTS[field])
  return getattr(data_config, field, DEFAULTS[field])


def _config_fields(data_config) -> list[str] | None:
  """The field names present in the config, or None when they cannot be listed."""
  if hasattr(data_config, 'keys'):
    return list(data_config.keys())
  if hasattr(data_config, '__dict__'):
    return [k for k in vars(data_config) if not k.startswith('_')]
  return None


def _is_int(value) -> bool:
  # bool is an int subclass, but `num_train=True` is a mistake, not 1.
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(value, field: str, minimum: int) -> int:
  if not _is_int(value) or value < minimum:
    raise ValueError(f'data.{field} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def validate_data_config(data_config) -> None:
  """Checks a `data` config section without loading any data.

  Args:
    data_config: ConfigDict (or attribute object / mapping) with the fields in `DEFAULTS`.

  Raises:
    ValueError: naming the offending `data.<field>` and, for choices, the valid values.
  """
  fields = _config_fields(data_config)
  if fields is not None:
    unknown = sorted(set(fields) - set(DEFAULTS))
    if unknown:
      raise ValueError(f'Unknown data config field(s) {unknown}; valid fields: '
                       f'{sorted(DEFAULTS)}.')

  source = _get(data_config, 'source')
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is not one of {SOURCES}.')
  for field in ('name', 'path', 'data_dir'):
    if not isinstance(_get(data_config, field), str):
      raise ValueError(f'data.{field} must be a string, got {_get(data_config, field)!r}.')
  download = _get(data_config, 'download')
  if not isinstance(download, (bool, np.bool_)):
    raise ValueError(f'data.download must be True or False, got {download!r}.')
  test_fraction = _get(data_config, 'test_fraction')
  if (not isinstance(test_fraction, (int, float, np.floating)) or isinstance(test_fraction, bool)
      or not 0.0 < float(test_fraction) < 1.0):
    raise ValueError(
        f'data.test_fraction must be a number in (0, 1) (exclusive), got {test_fraction!r}.')
  _check_int(_get(data_config, 'split_seed'), 'split_seed', 0)
  _check_int(_get(data_config, 'num_train'), 'num_train', 0)
  _check_int(_get(data_config, 'num_test'), 'num_test', 0)

  if source == 'tfds':
    name = _get(data_config, 'name')
    if name not in TFDS_NAMES:
      raise ValueError(f"data.name={name!r} is not a supported TFDS data set for "
                       f"data.source='tfds'; valid names: {TFDS_NAMES}.")
  elif source == 'npz':
    path = _get(data_config, 'path')
    layouts = ("arrays 'images' (uint8 [N,H,W] or [N,H,W,C]) and 'labels', or "
               "'train_images', 'train_labels', 'test_images', 'test_labels'")
    example = ("e.g. data.path='../shared/data/mnist10k.npz' (a pool) or "
               "'../shared/data/cifar10_partial.npz' (presplit), the files beside this "
               'repository')
    if not path:
      raise ValueError(f"data.path is empty, but data.source='npz' needs a .npz file with "
                       f'{layouts}; {example}.')
    if not os.path.isfile(path):
      raise ValueError(f'data.path={path!r} is not a file (resolved against the working '
                       f'directory {os.getcwd()!r}); set data.path to a .npz file with '
                       f'{layouts}; {example}.')
  elif source == 'fake':
    shape = _get(data_config, 'fake_shape')
    if (not isinstance(shape, collections.abc.Sequence) or len(shape) != 3
        or not all(_is_int(s) and s > 0 for s in shape)):
      raise ValueError(f'data.fake_shape must be (H, W, C) of positive integers, got {shape!r}.')
    _check_int(_get(data_config, 'fake_num_classes'), 'fake_num_classes', 1)
    _check_int(_get(data_config, 'fake_num_train'), 'fake_num_train', 1)
    _check_int(_get(data_config, 'fake_num_test'), 'fake_num_test', 1)


# --------------------------------------------------------------------------------------
# Deterministic, library-independent ordering.

_MASK64 = (1 << 64) - 1


def _hash_u64(values: np.ndarray, seed: int) -> np.ndarray:
  """SplitMix64 of `values` offset by `seed`; uint64 [N], identical on every machine."""
  z = values.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) & _MASK64)
  # uint64 array arithmetic wraps modulo 2**64 by definition, which is what the hash needs.
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """An ordering of all indices whose every prefix is (nearly) stratified by class.

  Each class is shuffled (by a hash of index and seed); its i-th member gets the rank
  fraction (i + 0.5) / n_class, and all indices are sorted by that fraction. The first k
  indices then hold, per class, within one of k * n_class / N members.

  Args:
    labels: int [N] class labels.
    seed: non-negative int.

  Returns:
    int64 [N], a permutation of range(N).
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  keys = _hash_u64(np.arange(n, dtype=np.uint64), seed)
  fraction = np.empty(n, np.float64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    members = members[np.argsort(keys[members], kind='stable')]
    fraction[members] = (np.arange(members.size) + 0.5) / members.size
  # Sort by fraction; ties (equal class sizes) broken by hash, then index.
  return np.lexsort((np.arange(n), keys, fraction))


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns sorted (train_idx, test_idx); the test size is ceil(N * test_fraction)."""
  n = labels.shape[0]
  # ceil like scikit-learn (1,797 digits -> 360 test); the epsilon absorbs float error
  # such as 10000 * 0.2 landing a hair above 2000.
  num_test = int(math.ceil(n * test_fraction - 1e-9))
  if not 0 < num_test < n:
    raise ValueError(f'data.test_fraction={test_fraction} leaves {num_test} of {n} examples '
                     'for testing; both splits must be non-empty.')
  order = stratified_order(labels, seed)
  return np.sort(order[num_test:]), np.sort(order[:num_test])


def _subset(images: np.ndarray, labels: np.ndarray, count: int, seed: int,
            field: str) -> tuple[np.ndarray, np.ndarray]:
  """Keeps a stratified subset of `count` examples (0 = all), in original order."""
  if count == 0:
    return images, labels
  if count > labels.shape[0]:
    raise ValueError(f'data.{field}={count} exceeds the {labels.shape[0]} examples available '
                     '(0 = all).')
  keep = np.sort(stratified_order(labels, seed)[:count])
  return images[keep], labels[keep]


# --------------------------------------------------------------------------------------
# Array checks and statistics.


def _as_uint8_images(array: np.ndarray, where: str) -> np.ndarray:
  """Validates images, adds a channel axis to NHW; returns uint8 [N, H, W, C]."""
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4 or min(array.shape[1:]) < 1:
    raise ValueError(f'{where} must have shape [N, H, W] or [N, H, W, C], got {array.shape}.')
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f'{where} has dtype {array.dtype}; expected uint8 (or integers within '
                     '0..255). Float images are not rescaled automatically; convert them to '
                     'uint8 0..255 first.')
  if array.size and (array.min() < 0 or array.max() > 255):
    raise ValueError(f'{where} has dtype {array.dtype} with values in '
                     f'[{array.min()}, {array.max()}]; expected uint8 values 0..255.')
  return array.astype(np.uint8)


def _as_int32_labels(array: np.ndarray, where: str, num_images: int) -> np.ndarray:
  if array.ndim != 1:
    raise ValueError(f'{where} must be 1-D [N], got shape {array.shape}.')
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f'{where} has dtype {array.dtype}; expected integer class labels.')
  if array.shape[0] != num_images:
    raise ValueError(f'{where} has {array.shape[0]} labels but the images array has '
                     f'{num_images} images.')
  if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
    raise ValueError(f'{where} has labels in [{array.min()}, {array.max()}]; labels must be '
                     'non-negative class indices.')
  return array.astype(np.int32)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...],
                                                                   tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units.

  Args:
    images: uint8 [N, H, W, C].
    chunk: images per accumulation step (bounds the float64 temporary).

  Returns:
    (mean, std), each a tuple of C Python floats.
  """
  c = images.shape[-1]
  total = np.zeros(c, np.float64)
  total_sq = np.zeros(c, np.float64)
  for start in range(0, images.shape[0], chunk):
    block = images[start:start + chunk].reshape(-1, c).astype(np.float64) / 255.0
    total += block.sum(0)
    total_sq += np.square(block).sum(0)
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _make_splits(name: str, train_images, train_labels, test_images, test_labels, *,
                 num_classes: int, class_names, data_config, stats=None) -> Splits:
  """Applies the num_train/num_test subsets, computes stats and freezes the arrays."""
  seed = int(_get(data_config, 'split_seed'))
  train_images, train_labels = _subset(train_images, train_labels,
                                       int(_get(data_config, 'num_train')), seed, 'num_train')
  test_images, test_labels = _subset(test_images, test_labels,
                                     int(_get(data_config, 'num_test')), seed, 'num_test')
  if stats is None:
    stats = channel_stats(train_images)
    if min(stats[1]) == 0.0:
      # A constant channel would make the model's normalization divide by zero.
      raise ValueError(f'Data set {name!r}: a channel of the training images is constant '
                       f'(std={stats[1]}); cannot normalize it.')
  arrays = []
  for array in (train_images, train_labels, test_images, test_labels):
    array = np.ascontiguousarray(array)
    array.setflags(write=False)  # Shared by training and evaluation; nobody edits it.
    arrays.append(array)
  info = DatasetInfo(
      name=name, num_classes=int(num_classes), image_shape=tuple(int(s) for s in
                                                                  train_images.shape[1:]),
      num_train=int(train_labels.shape[0]), num_test=int(test_labels.shape[0]),
      mean=tuple(stats[0]), std=tuple(stats[1]),
      class_names=None if class_names is None else tuple(str(n) for n in class_names))
  return Splits(*arrays, info=info)


# --------------------------------------------------------------------------------------
# Sources.


def _load_digits(data_config) -> Splits:
  from sklearn import datasets  # Imported here: scikit-learn is slow to import.
  digits = datasets.load_digits()
  # Pixel values are integers 0..16; round(v * 255 / 16) maps them onto 0..255.
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = _stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
  return _make_splits('digits', images[train], labels[train], images[test], labels[test],
                      num_classes=10, class_names=[str(i) for i in range(10)],
                      data_config=data_config)


def _load_npz(data_config) -> Splits:
  path = _get(data_config, 'path')
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'data.path={path!r} could not be read as a .npz file: {e}') from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f'data.path={path!r} holds a single .npy array, not a .npz archive.')
  with archive:
    keys = set(archive.files)
    has_pool = bool(keys & set(_NPZ_POOL_KEYS))
    has_presplit = bool(keys & set(_NPZ_PRESPLIT_KEYS))
    if has_pool and has_presplit:
      raise ValueError(f'{path}: holds both pool arrays {_NPZ_POOL_KEYS} and presplit arrays '
                       f'{_NPZ_PRESPLIT_KEYS}; keep one layout.')
    needed = _NPZ_POOL_KEYS if has_pool else _NPZ_PRESPLIT_KEYS
    missing = [k for k in needed if k not in keys]
    if missing or not (has_pool or has_presplit):
      raise ValueError(f'{path}: missing arrays {missing or list(needed)} (found '
                       f'{sorted(keys)}); expected {_NPZ_POOL_KEYS} or {_NPZ_PRESPLIT_KEYS}.')

    def read(key):
      try:
        return archive[key]
      except ValueError as e:  # Object arrays need pickle, which is refused.
        raise ValueError(f'{path}: array {key!r} could not be read without pickle: {e}') from e

    if has_pool:
      images = _as_uint8_images(read('images'), f"{path}: array 'images'")
      labels = _as_int32_labels(read('labels'), f"{path}: array 'labels'", images.shape[0])
      train, test = _stratified_split(labels, float(_get(data_config, 'test_fraction')),
                                      int(_get(data_config, 'split_seed')))
      parts = images[train], labels[train], images[test], labels[test]
    else:
      parts = []
      for split in ('train', 'test'):
        images = _as_uint8_images(read(f'{split}_images'), f"{path}: array '{split}_images'")
        labels = _as_int32_labels(read(f'{split}_labels'), f"{path}: array '{split}_labels'",
                                  images.shape[0])
        if images.shape[0] == 0:
          raise ValueError(f"{path}: array '{split}_images' is empty.")
        parts += [images, labels]
      if parts[0].shape[1:] != parts[2].shape[1:]:
        raise ValueError(f"{path}: 'train_images' are {parts[0].shape[1:]} but 'test_images' "
                         f'are {parts[2].shape[1:]}; image shapes must match.')
    class_names = [str(n) for n in read('class_names')] if 'class_names' in keys else None

  max_label = int(max(parts[1].max(), parts[3].max()))
  num_classes = max_label + 1
  if class_names is not None:
    if max_label >= len(class_names):
      raise ValueError(f"{path}: labels reach {max_label} but 'class_names' lists only "
                       f'{len(class_names)} classes.')
    num_classes = len(class_names)
  name = _get(data_config, 'name') or os.path.splitext(os.path.basename(path))[0]
  return _make_splits(name, *parts, num_classes=num_classes, class_names=class_names,
                      data_config=data_config)


def _load_fake(data_config) -> Splits:
  h, w, c = (int(s) for s in _get(data_config, 'fake_shape'))
  k = int(_get(data_config, 'fake_num_classes'))
  n_train = int(_get(data_config, 'fake_num_train'))
  n_test = int(_get(data_config, 'fake_num_test'))
  rng = np.random.default_rng(int(_get(data_config, 'split_seed')))
  # One prototype per class plus noise: random, yet learnable by a small model.
  prototypes = rng.integers(0, 256, (k, h, w, c)).astype(np.float32)

  def sample(n):
    labels = rng.integers(0, k, n).astype(np.int32)
    noise = rng.integers(0, 256, (n, h, w, c)).astype(np.float32)
    images = np.rint(0.6 * prototypes[labels] + 0.4 * noise).astype(np.uint8)
    return images, labels

  train = sample(n_train)
  test = sample(n_test)
  return _make_splits(_get(data_config, 'name') or 'fake', *train, *test, num_classes=k,
                      class_names=None, data_config=data_config)


def _exception_chain(error: BaseException) -> list[BaseException]:
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _missing_module(error: BaseException) -> str | None:
  if not isinstance(error, ModuleNotFoundError):
    return None
  # TFDS re-raises feature-encoding errors with a prefixed message, which drops `.name`.
  match = re.search(r"No module named '([^']+)'", str(error))
  return error.name or (match.group(1) if match else None)


def _is_offline_error(error: BaseException) -> bool:
  offline = (ConnectionError, socket.gaierror, socket.timeout, urllib.error.URLError)
  if isinstance(error, offline):
    return True
  try:
    import requests  # A TFDS dependency; TFDS downloads with it.
  except ImportError:
    return False
  return isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))


def _tfds_root(tfds, name: str, data_dir: str) -> str:
  """The directory TFDS uses for `data_dir` ('' = TFDS's default, e.g. ~/tensorflow_datasets)."""
  builder = tfds.builder(name, data_dir=data_dir or None, file_format='array_record')
  # builder.data_dir is <root>/<name>/<version> for these builders (none has configs).
  return os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))


def _explain_tfds_failure(tfds, error: Exception, name: str, data_dir: str,
                          download: bool) -> Exception | None:
  """Maps a failure of tfds.data_source to a DataUnavailableError, or None if unknown."""
  try:
    root = _tfds_root(tfds, name, data_dir)
  except Exception:  # pylint: disable=broad-except
    return None  # Cannot even build the builder: the original error is the useful one.
  hint = _PREPARE_HINT.format(name=name, data_dir=root)
  chain = _exception_chain(error)
  for e in chain:
    module = _missing_module(e)
    if module == 'tensorflow':
      return DataUnavailableError(
          f"TFDS data set {name!r} is not prepared in {root}, and preparing it failed because "
          f"TensorFlow is not installed: TFDS's {name} builder needs TensorFlow to write the "
          'data set once (reading it afterwards does not).\n' + hint)
    if module is not None:
      return DataUnavailableError(
          f'Preparing TFDS data set {name!r} in {root} failed: Python module {module!r} is '
          f'missing (usually `pip install {module}`). Preparing also needs network access '
          'and TensorFlow.\n' + hint)
  if any(_is_offline_error(e) for e in chain):
    return DataUnavailableError(
        f'TFDS data set {name!r} is not prepared in {root} and downloading it failed: no '
        f'network access ({type(error).__name__}). Preparing it needs network access and '
        'TensorFlow.\n' + hint)
  if any(isinstance(e, NotImplementedError) and 'random access' in str(e).lower()
         for e in chain):
    return DataUnavailableError(
        f'TFDS data set {name!r} in {root} was prepared in a format without random access '
        '(TFRecord, the default of tfds.load); advdef reads array_record. Prepare it again '
        'into another data_dir (or delete the old one):\n' + hint)
  if not download:
    builder = tfds.builder(name, data_dir=data_dir or None, file_format='array_record')
    if not builder.is_prepared():
      return DataUnavailableError(
          f'TFDS data set {name!r} is not prepared in {root}, and data.download is False. '
          'Set data.download=True where there is network access and TensorFlow, or:\n' + hint)
  return None


def _load_tfds(data_config) -> Splits:
  import tensorflow_datasets as tfds  # Imported here: slow, and only this source needs it.
  name = _get(data_config, 'name')
  data_dir = _get(data_config, 'data_dir')
  download = bool(_get(data_config, 'download'))
  try:
    # tfds.data_source selects array_record only when no data_dir is given; with a data_dir
    # it would prepare TFRecord files it cannot read, so the format is always passed.
    sources = tfds.data_source(
        name, split=list(_TFDS_SPLITS), data_dir=data_dir or None, download=download,
        builder_kwargs={'file_format': 'array_record'},
        download_and_prepare_kwargs={'file_format': 'array_record'})
  except Exception as e:  # pylint: disable=broad-except
    explained = _explain_tfds_failure(tfds, e, name, data_dir, download)
    if explained is None:
      raise
    raise explained from e

  features = sources[0].dataset_info.features
  label_feature = features[_TFDS_LABEL_KEY]
  image_shape = tuple(features[_TFDS_IMAGE_KEY].shape)
  parts = []
  for split, source in zip(_TFDS_SPLITS, sources):
    n = len(source)
    images = np.empty((n, *image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    # One record at a time: DataSource.__getitems__ would batch reads, but the data sources
    # that tfds.testing.mock_data installs break on it (tfds 4.9.10), and the tests need those.
    for i in range(n):
      example = source[i]
      images[i] = example[_TFDS_IMAGE_KEY]
      labels[i] = example[_TFDS_LABEL_KEY]
    parts += [images, labels]
  stats = _TFDS_STATS.get(name)
  return _make_splits(name, *parts, num_classes=label_feature.num_classes,
                      class_names=label_feature.names, data_config=data_config, stats=stats)


def load_dataset(data_config) -> Splits:
  """Loads the data set described by a `data` config section.

  Args:
    data_config: ConfigDict (or attribute object / mapping) with the fields in `DEFAULTS`.

  Returns:
    `Splits` with uint8 NHWC images and int32 labels.

  Raises:
    ValueError: bad config or malformed data (message names the field or file/array).
    DataUnavailableError: a TFDS data set is not prepared and cannot be prepared here.
  """
  validate_data_config(data_config)
  source = _get(data_config, 'source')
  loaders = {'digits': _load_digits, 'npz': _load_npz, 'tfds': _load_tfds, 'fake': _load_fake}
  return loaders[source](data_config)


# --------------------------------------------------------------------------------------
# Device-resident input pipeline.


_INV_255 = np.float32(1.0 / 255.0)


def _check_key(key, argument: str) -> None:
  if not (hasattr(key, 'dtype') and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise ValueError(f'{argument} must be a typed PRNG key from jax.random.key(seed), got '
                     f'{getattr(key, "dtype", type(key))}.')


def to_float(images_u8):
  """uint8 images -> float32 in [0, 1], as v * float32(1 / 255).

  Multiplying by the float32 reciprocal (255 -> exactly 1.0) gives bit-identical results
  in numpy and XLA; a division would not (XLA's CPU backend divides via a reciprocal).

  Args:
    images_u8: uint8 array of any shape, numpy or jax.

  Returns:
    float32 array of the same shape; numpy in, numpy out; jax in, jax out.
  """
  if images_u8.dtype != np.uint8:
    # Guards against scaling twice: floats here usually mean already-converted images.
    raise ValueError(f'to_float expects uint8 images, got dtype {images_u8.dtype}.')
  if isinstance(images_u8, np.ndarray):
    return images_u8.astype(np.float32) * _INV_255
  return images_u8.astype(jnp.float32) * _INV_255


def epoch_permutation(data_key, epoch, num_examples: int):
  """The example order of one epoch: same key and epoch, same order.

  Args:
    data_key: typed PRNG key.
    epoch: int (may be traced).
    num_examples: static int N.

  Returns:
    int32 [N], a permutation of range(N).
  """
  _check_key(data_key, 'data_key')
  return jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                num_examples).astype(jnp.int32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch; training drops the remainder (a new one each epoch).

  Raises:
    ValueError: batch_size < 1, or larger than num_examples (no full batch).
  """
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f'train.batch_size must be a positive integer, got {batch_size!r}.')
  steps = int(num_examples) // int(batch_size)
  if steps == 0:
    raise ValueError(f'train.batch_size={batch_size} exceeds the {num_examples} training '
                     'examples (an epoch would have no full batch); lower it.')
  return steps


def augment(key, x, *, crop_padding: int, flip: bool):
  """Random crop from a zero-padded image and random horizontal flip, per example.

  Args:
    key: typed PRNG key.
    x: float32 [B, H, W, C].
    crop_padding: static int >= 0; pixels of zero padding on each side before cropping
      back to H x W (offsets uniform in [0, 2 * crop_padding] per axis). 0 disables.
    flip: static bool; mirror each example left-right with probability 1/2.

  Returns:
    float32 [B, H, W, C].
  """
  if not _is_int(crop_padding) or crop_padding < 0:
    raise ValueError(f'crop_padding must be an integer >= 0 (train.augment.crop_padding), '
                     f'got {crop_padding!r}.')
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f'flip must be True or False (train.augment.flip), got {flip!r}.')
  if x.ndim != 4:
    raise ValueError(f'augment expects [B, H, W, C] images, got shape {x.shape}.')
  _check_key(key, 'aug_key')
  # Always split, so the crop draws do not depend on whether flipping is on.
  crop_key, flip_key = jax.random.split(key)
  b, h, w, c = x.shape
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)
    x = jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (b,))
    x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
  return x


def train_batch(images_u8, labels, perm, step_in_epoch, aug_key, *, batch_size: int,
                crop_padding: int = 0, flip: bool = False):
  """Gathers and augments one training batch on the device.

  Meant to run inside `jax.jit` with the data set arrays as (non-donated) arguments, so a
  step never transfers data from the host.

  Args:
    images_u8: uint8 [N, H, W, C] (numpy or device array).
    labels: int [N].
    perm: int32 [N] from `epoch_permutation`.
    step_in_epoch: int in [0, steps_per_epoch) (may be traced). Out-of-range values are
      clamped by lax.dynamic_slice (the last full batch is repeated), so callers take it
      modulo steps_per_epoch.
    aug_key: typed PRNG key for the augmentation.
    batch_size: static int B <= N.
    crop_padding: static int, see `augment`.
    flip: static bool, see `augment`.

  Returns:
    (x float32 [B, H, W, C] in [0, 1], y int32 [B]).
  """
  n = perm.shape[0]
  if not _is_int(batch_size) or not 0 < batch_size <= n:
    raise ValueError(f'batch_size must be an integer in [1, {n}] (the permutation length), '
                     f'got {batch_size!r}.')
  if _is_int(step_in_epoch) and not 0 <= step_in_epoch < n // batch_size:
    raise ValueError(f'step_in_epoch={step_in_epoch} is outside [0, {n // batch_size}).')
  start = jnp.asarray(step_in_epoch, jnp.int32) * batch_size
  idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
  x = to_float(jnp.take(images_u8, idx, axis=0))
  y = jnp.take(labels, idx, axis=0).astype(jnp.int32)
  if crop_padding or flip:
    x = augment(aug_key, x, crop_padding=crop_padding, flip=flip)
  return x, y


def eval_batches(images_u8, labels, batch_size: int) -> Iterator[dict[str, Any]]:
  """Fixed-shape evaluation batches over a whole split, in order.

  The last partial batch is padded with copies of the split's last row and masked out, so
  every batch has the same shape (one compilation) and masked counts are exact. Device
  arrays are sliced on the device; numpy arrays yield numpy batches.

  Args:
    images_u8: uint8 [N, H, W, C], numpy or jax.
    labels: int [N].
    batch_size: int B >= 1.

  Returns:
    An iterator of dicts: image float32 [B, H, W, C] in [0, 1], label int32 [B],
    mask bool [B] (True for real rows).
  """
  # Validated here, not in the generator, so bad arguments fail at the call.
  n = images_u8.shape[0]
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')
  if n == 0:
    raise ValueError('eval_batches got an empty split (0 examples).')
  if labels.shape[0] != n:
    raise ValueError(f'eval_batches got {n} images but {labels.shape[0]} labels.')
  if images_u8.dtype != np.uint8:
    raise ValueError(f'eval_batches expects uint8 images, got dtype {images_u8.dtype}.')
  xp = np if isinstance(images_u8, np.ndarray) else jnp

  def generate():
    for start in range(0, n, batch_size):
      real = min(batch_size, n - start)
      if real == batch_size:
        image, label = images_u8[start:start + batch_size], labels[start:start + batch_size]
      else:
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        image, label = xp.take(images_u8, idx, axis=0), xp.take(labels, idx, axis=0)
      yield {'image': to_float(image), 'label': label.astype(xp.int32),
             'mask': xp.asarray(np.arange(batch_size) < real)}

  return generate()
