"""Data sets in host memory: config validation, the sources, and `load_dataset`.

`load_dataset(data_config)` validates a `data` config section (`validate_data_config`) and
returns `Splits` from one of `SOURCES`: 'digits', 'npz' (pool or presplit layout), 'tfds'
(read by advdef.data.tfds_source) or 'fake'. Splits and subsets are stratified with a
machine-independent hash order (`stratified_order`); `channel_stats` gives the per-channel
mean/std that `DatasetInfo` carries for the models' normalization.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os

import numpy as np

from advdef import config_utils
from advdef import validate
from advdef.data import tfds_source

SOURCES = ('digits', 'npz', 'tfds', 'fake')
TFDS_NAMES = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn_cropped', 'stl10')

# Fields of the `data` config section and the values used when a field is absent: those of
# config_utils.base_config, the one home of defaults. Unknown fields are rejected (a typo
# such as `num_trian` must not be ignored). One exception: base_config names its default
# data set ('digits', part of checkpoint fingerprints), but an absent name here means the
# source's own label (the .npz file's stem, 'fake').
DEFAULTS = {**config_utils.base_config().data.to_dict(), 'name': ''}

# The digits split is part of the data set's definition, so results are comparable.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# What a run evaluates on: the test split, or the validation split held out of training
# (data.validation_fraction), on which hyperparameters are chosen without seeing test images.
EVAL_SPLITS = ('test', 'validation')
# The validation split's hash seed is split_seed + this, so it is not the test split's order.
_VALIDATION_SEED_OFFSET = 7919

_NPZ_POOL_KEYS = ('images', 'labels')
_NPZ_PRESPLIT_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a loaded data set.

  Attributes:
    name: The data set's name (TFDS name, or the config's label for npz/fake).
    num_classes: Number of classes; labels lie in [0, num_classes).
    image_shape: (H, W, C) of one image.
    num_train: Number of training examples returned (after any `data.num_train` subset).
    num_test: Number of evaluation examples returned (after any `data.num_test` subset):
      test examples, or validation examples when `evaluation_split` is 'validation'.
    mean: Per-channel mean, length C, in [0, 1] pixel units: the standard values for
      mnist, fashion_mnist, cifar10 and cifar100 from TFDS, otherwise computed from the
      returned training images.
    std: Per-channel (population) standard deviation, length C, same units and origin.
    class_names: One name per class, or None when the source has none.
    evaluation_split: 'test', or 'validation' when the test arrays of `Splits` hold the
      validation examples (data.eval_split).
    num_validation: Examples held out of training as the validation split (0: none).
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...] | None = None
  evaluation_split: str = 'test'
  num_validation: int = 0


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
  validate.check_choice('data.source', source, SOURCES)
  for field in ('name', 'path', 'data_dir'):
    if not isinstance(_get(data_config, field), str):
      raise ValueError(f'data.{field} must be a string, got {_get(data_config, field)!r}.')
  validate.check_bool('data.download', _get(data_config, 'download'))
  test_fraction = _get(data_config, 'test_fraction')
  if (not isinstance(test_fraction, (int, float, np.floating)) or isinstance(test_fraction, bool)
      or not 0.0 < float(test_fraction) < 1.0):
    raise ValueError(
        f'data.test_fraction must be a number in (0, 1) (exclusive), got {test_fraction!r}.')
  for field in ('split_seed', 'num_train', 'num_test'):
    validate.check_int(f'data.{field}', _get(data_config, field), 0)
  validation_fraction = _get(data_config, 'validation_fraction')
  if (not isinstance(validation_fraction, (int, float, np.floating))
      or isinstance(validation_fraction, bool) or not 0.0 <= float(validation_fraction) < 1.0):
    raise ValueError('data.validation_fraction must be a number in [0, 1) (0: no validation '
                     f'split), got {validation_fraction!r}.')
  eval_split = _get(data_config, 'eval_split')
  validate.check_choice('data.eval_split', eval_split, EVAL_SPLITS)
  if eval_split == 'validation' and not validation_fraction:
    raise ValueError("data.eval_split='validation' needs data.validation_fraction > 0 (the "
                     'share of the training split held out), got 0.')

  if source == 'tfds':
    # Not validate.check_choice: base_config's default name 'digits' lands here when only
    # the source is changed, and the message must say why 'digits' is not valid.
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
    if not isinstance(shape, collections.abc.Sequence) or len(shape) != 3:
      raise ValueError(f'data.fake_shape must be (H, W, C) of positive integers, got {shape!r}.')
    for i, size in enumerate(shape):
      validate.check_int(f'data.fake_shape[{i}]', size, 1)
    for field in ('fake_num_classes', 'fake_num_train', 'fake_num_test'):
      validate.check_int(f'data.{field}', _get(data_config, field), 1)


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


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int,
                      field: str = 'test_fraction') -> tuple[np.ndarray, np.ndarray]:
  """Returns sorted (train_idx, test_idx); the test size is ceil(N * test_fraction)."""
  n = labels.shape[0]
  # ceil like scikit-learn (1,797 digits -> 360 test); the epsilon absorbs float error
  # such as 10000 * 0.2 landing a hair above 2000.
  num_test = int(math.ceil(n * test_fraction - 1e-9))
  if not 0 < num_test < n:
    raise ValueError(f'data.{field}={test_fraction} leaves {num_test} of {n} examples '
                     'for it; both splits must be non-empty.')
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
  """Holds out the validation split, applies the num_train/num_test subsets, computes stats
  and freezes the arrays."""
  seed = int(_get(data_config, 'split_seed'))
  validation_fraction = float(_get(data_config, 'validation_fraction'))
  evaluation_split, num_validation = _get(data_config, 'eval_split'), 0
  if validation_fraction:
    # Held out of every run with the same data config, whichever split it evaluates on, so
    # a model trained for selection and its test evaluation saw the same training images.
    train_idx, val_idx = _stratified_split(train_labels, validation_fraction,
                                           seed + _VALIDATION_SEED_OFFSET,
                                           field='validation_fraction')
    num_validation = int(val_idx.size)
    if evaluation_split == 'validation':
      test_images, test_labels = train_images[val_idx], train_labels[val_idx]
    train_images, train_labels = train_images[train_idx], train_labels[train_idx]
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
      class_names=None if class_names is None else tuple(str(n) for n in class_names),
      evaluation_split=evaluation_split, num_validation=num_validation)
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


def _load_tfds(data_config) -> Splits:
  name = _get(data_config, 'name')
  parts, num_classes, class_names, stats = tfds_source.read_splits(
      name, _get(data_config, 'data_dir'), bool(_get(data_config, 'download')))
  return _make_splits(name, *parts, num_classes=num_classes, class_names=class_names,
                      data_config=data_config, stats=stats)


def load_dataset(data_config) -> Splits:
  """Loads the data set described by a `data` config section.

  Args:
    data_config: ConfigDict (or attribute object / mapping) with the fields in `DEFAULTS`.

  Returns:
    `Splits` with uint8 NHWC images and int32 labels.

  Raises:
    ValueError: bad config or malformed data (message names the field or file/array).
    tfds_source.DataUnavailableError: a TFDS data set is not prepared and cannot be prepared
      here.
  """
  validate_data_config(data_config)
  source = _get(data_config, 'source')
  loaders = {'digits': _load_digits, 'npz': _load_npz, 'tfds': _load_tfds, 'fake': _load_fake}
  return loaders[source](data_config)
