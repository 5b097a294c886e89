"""The 'tfds' source: reading a prepared TFDS data set, and explaining why it is not there.

`read_splits` reads the train and test splits of a TFDS data set with `tfds.data_source`
(array_record, random access; reading needs no TensorFlow, preparing it once does; see
scripts/prepare_tfds.py). When that fails for a reason a person can fix (TensorFlow missing,
no network, the wrong file format, data.download=False), it raises `DataUnavailableError`
with the commands that prepare the data set; other errors propagate unchanged.

advdef.data.sources turns the arrays into `Splits`; this module knows nothing of configs.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error

import numpy as np

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


def read_splits(name: str, data_dir: str, download: bool):
  """Reads the train and test splits of a TFDS data set into host memory.

  Args:
    name: a TFDS name from advdef.data.sources.TFDS_NAMES.
    data_dir: TFDS data directory ('' = TFDS's default).
    download: whether TFDS may download and prepare a missing data set.

  Returns:
    (parts, num_classes, class_names, stats): parts is [train_images uint8 [N, H, W, C],
    train_labels int32 [N], test_images, test_labels]; class_names a list of C strings;
    stats the standard (mean, std) per channel in [0, 1] pixel units, or None when this
    data set has none (then they are computed from the training images).

  Raises:
    DataUnavailableError: the data set is not prepared and cannot be prepared here.
  """
  import tensorflow_datasets as tfds  # Imported here: slow, and only this source needs it.
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
  for source in sources:
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
  return parts, label_feature.num_classes, label_feature.names, _TFDS_STATS.get(name)
