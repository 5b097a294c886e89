"""Tests for advdef.data: sources, validation, TFDS error messages and the input pipeline."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import data
from advdef.data import tfds_source


def make_config(**overrides):
  fields = dict(data.DEFAULTS)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def class_counts(labels, num_classes=10):
  return np.bincount(labels, minlength=num_classes)


def assert_stratified(train_labels, test_labels, fraction, num_classes=10):
  test = class_counts(test_labels, num_classes)
  total = test + class_counts(train_labels, num_classes)
  np.testing.assert_array_less(np.abs(test - fraction * total), 1.0 + 1e-9)


# --------------------------------------------------------------------------------------
# Sources.


@pytest.fixture(scope='module')
def digits():
  return data.load_dataset(make_config(source='digits'))


def test_digits_shapes_counts_and_range(digits):
  assert digits.train_images.shape == (1437, 8, 8, 1)
  assert digits.test_images.shape == (360, 8, 8, 1)
  assert digits.train_images.dtype == np.uint8 and digits.train_labels.dtype == np.int32
  assert digits.info.num_train + digits.info.num_test == 1797
  assert digits.info.image_shape == (8, 8, 1) and digits.info.num_classes == 10
  assert digits.train_images.max() == 255 and digits.train_images.min() == 0
  # The split partitions the bundled set: per-class totals are sklearn's.
  from sklearn import datasets
  target = datasets.load_digits().target
  np.testing.assert_array_equal(
      class_counts(digits.train_labels) + class_counts(digits.test_labels),
      class_counts(target))
  assert_stratified(digits.train_labels, digits.test_labels, 0.2)
  mean, std = data.channel_stats(digits.train_images)
  assert digits.info.mean == pytest.approx(mean) and len(digits.info.std) == 1
  assert not digits.train_images.flags.writeable


def test_digits_split_is_fixed(digits):
  # Config seed and fraction do not move the digits split.
  again = data.load_dataset(make_config(source='digits', split_seed=7, test_fraction=0.5))
  np.testing.assert_array_equal(again.train_images, digits.train_images)
  np.testing.assert_array_equal(again.test_labels, digits.test_labels)


def test_stratified_order_is_pinned():
  # Pins the hash-based order, so a refactor cannot silently change published splits.
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  order = data.stratified_order(labels, seed=0)
  assert order.tolist() == [6, 2, 4, 0, 8, 3, 5, 7, 1]
  np.testing.assert_array_equal(np.sort(labels[order[:3]]), [0, 1, 2])
  np.testing.assert_array_equal(order, data.stratified_order(labels, seed=0))
  assert not np.array_equal(order, data.stratified_order(labels, seed=1))


def test_num_train_num_test_subsets_are_stratified_and_deterministic():
  config = make_config(source='digits', num_train=200, num_test=50, split_seed=3)
  a, b = data.load_dataset(config), data.load_dataset(config)
  assert a.train_images.shape == (200, 8, 8, 1) and a.info.num_train == 200
  assert a.info.num_test == 50
  np.testing.assert_array_equal(a.train_images, b.train_images)
  counts = class_counts(a.train_labels)
  assert counts.min() >= 19 and counts.max() <= 21
  with pytest.raises(ValueError, match='data.num_train=5000 exceeds the 1437'):
    data.load_dataset(make_config(source='digits', num_train=5000))


def write_pool(path, images, labels, **extra):
  np.savez(path, images=images, labels=labels, **extra)
  return str(path)


def test_npz_pool_nhw_gets_channel_and_stratified_split(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10).astype(np.uint8)
  images = rng.integers(0, 256, (30, 5, 4), dtype=np.uint8)
  path = write_pool(tmp_path / 'pool.npz', images, labels)
  splits = data.load_dataset(make_config(source='npz', path=path, test_fraction=0.2))
  assert splits.train_images.shape == (24, 5, 4, 1) and splits.test_images.shape == (6, 5, 4, 1)
  np.testing.assert_array_equal(class_counts(splits.test_labels, 3), [2, 2, 2])
  assert splits.info.name == 'pool' and splits.info.num_classes == 3
  # Every image is used exactly once, with its own label.
  both = np.concatenate([splits.train_images, splits.test_images])[..., 0]
  both_labels = np.concatenate([splits.train_labels, splits.test_labels])
  for image, label in zip(images, labels):
    (hit,) = np.flatnonzero((both == image).all(axis=(1, 2)))
    assert both_labels[hit] == label
  other = data.load_dataset(make_config(source='npz', path=path, split_seed=1))
  assert not np.array_equal(other.test_images, splits.test_images)


def test_npz_integer_images_are_converted(tmp_path):
  images = np.arange(2 * 10 * 3 * 3).reshape(20, 3, 3, 1) % 256  # int64, NHWC
  path = write_pool(tmp_path / 'ints.npz', images, np.arange(20) % 2)
  splits = data.load_dataset(make_config(source='npz', path=path, name='ints'))
  assert splits.train_images.dtype == np.uint8 and splits.info.name == 'ints'
  assert splits.info.image_shape == (3, 3, 1)


@pytest.mark.parametrize('images, labels, message', [
    (np.full((10, 4, 4), 300), np.arange(10) % 2, r"'images' has dtype int64 with values"),
    (np.zeros((10, 4, 4), np.float32), np.arange(10) % 2, r"'images' has dtype float32"),
    (np.zeros((10, 4, 4), np.uint8), np.arange(9) % 2, r"'labels' has 9 labels but .* 10"),
    (np.zeros((10, 4, 4), np.uint8), np.arange(10) - 1, r"'labels' has labels in \[-1"),
])
def test_npz_bad_arrays_name_file_and_array(tmp_path, images, labels, message):
  path = write_pool(tmp_path / 'bad.npz', images, labels)
  with pytest.raises(ValueError, match=message) as error:
    data.load_dataset(make_config(source='npz', path=path))
  assert 'bad.npz' in str(error.value)


def test_npz_missing_arrays_lists_layouts(tmp_path):
  path = tmp_path / 'odd.npz'
  np.savez(path, x=np.zeros(3))
  with pytest.raises(ValueError, match=r"missing arrays .*found \['x'\]"):
    data.load_dataset(make_config(source='npz', path=str(path)))


def test_npz_mnist10k_pool(mnist10k_path):
  splits = data.load_dataset(make_config(source='npz', path=str(mnist10k_path),
                                         name='mnist10k', test_fraction=0.2))
  assert splits.train_images.shape == (8000, 28, 28, 1)
  assert splits.test_images.shape == (2000, 28, 28, 1)
  assert splits.info.num_classes == 10
  assert_stratified(splits.train_labels, splits.test_labels, 0.2)
  # Real MNIST statistics, from a subset: close to the usual 0.1307 / 0.3081.
  assert splits.info.mean[0] == pytest.approx(0.1307, abs=0.01)
  assert splits.info.std[0] == pytest.approx(0.3081, abs=0.01)


def test_npz_cifar_partial_presplit(cifar_partial_path):
  splits = data.load_dataset(make_config(source='npz', path=str(cifar_partial_path)))
  assert splits.train_images.shape == (4660, 32, 32, 3)
  assert splits.test_images.shape == (846, 32, 32, 3)
  assert splits.test_labels[0] == 3  # The official first test image is a cat.
  assert splits.info.num_classes == 10 and len(splits.info.mean) == 3
  np.testing.assert_allclose(splits.info.mean, (0.4914, 0.4822, 0.4465), atol=0.03)


def test_validation_split_is_held_out_of_training_and_replaces_test_only_when_asked(digits):
  held = data.load_dataset(make_config(source='digits', validation_fraction=0.25))
  val = data.load_dataset(make_config(source='digits', validation_fraction=0.25,
                                      eval_split='validation'))
  n_train = digits.info.num_train
  num_val = -(-n_train // 4)  # ceil, as the test split's size
  assert held.info.num_validation == val.info.num_validation == num_val
  assert held.info.num_train == val.info.num_train == n_train - num_val
  # The same training images whichever split is evaluated; the test split untouched.
  np.testing.assert_array_equal(held.train_images, val.train_images)
  np.testing.assert_array_equal(held.test_images, digits.test_images)
  assert held.info.evaluation_split == 'test' and val.info.evaluation_split == 'validation'
  # The validation images are the training split's, minus those kept for training.
  rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
  assert val.info.num_test == num_val and len(val.test_labels) == num_val
  assert rows(val.test_images) <= rows(digits.train_images)
  assert not rows(val.test_images) & rows(val.train_images)
  assert not rows(val.test_images) & rows(digits.test_images)
  assert_stratified(val.train_labels, val.test_labels, 0.25)
  # Deterministic, and not the test split's hash order (another seed).
  again = data.load_dataset(make_config(source='digits', validation_fraction=0.25,
                                        eval_split='validation'))
  np.testing.assert_array_equal(again.test_images, val.test_images)


def test_fake_is_deterministic_and_shaped():
  config = make_config(source='fake', name='tiny', fake_shape=(6, 5, 3), fake_num_classes=4,
                       fake_num_train=40, fake_num_test=12)
  a, b = data.load_dataset(config), data.load_dataset(config)
  assert a.train_images.shape == (40, 6, 5, 3) and a.test_labels.shape == (12,)
  assert a.info.num_classes == 4 and a.info.name == 'tiny'
  assert a.train_labels.max() < 4
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)


# --------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize('overrides, message', [
    (dict(source='csv'), r"data.source='csv' is not valid; valid choices: digits, npz, tfds, fake"),
    (dict(source='tfds', name='imagenet'), r"data.name='imagenet' .*'mnist', 'fashion_mnist'"),
    (dict(source='npz', path=''), r'data.path is empty.*mnist10k.npz'),
    (dict(source='npz', path='/no/such/file.npz'), r"data.path='/no/such/file.npz' is not a file"),
    (dict(num_train=-1), r'data.num_train=-1 must be an integer >= 0'),
    (dict(num_test=2.5), r'data.num_test=2.5 must be an integer >= 0'),
    (dict(split_seed=True), r'data.split_seed=True must be an integer >= 0'),
    (dict(download='yes'), r"data.download='yes' must be True or False"),
    (dict(test_fraction=1.0), r'data.test_fraction must be a number in \(0, 1\)'),
    (dict(test_fraction=0.0), r'data.test_fraction must be a number in \(0, 1\)'),
    (dict(source='fake', fake_shape=(8, 8)), r'data.fake_shape must be \(H, W, C\)'),
    (dict(source='fake', fake_shape=(8, 0, 1)), r'data.fake_shape\[1\]=0 must be an integer >= 1'),
    (dict(source='fake', fake_num_classes=0), r'data.fake_num_classes=0 must be an integer >= 1'),
    (dict(num_trian=5), r"Unknown data config field\(s\) \['num_trian'\]"),
    (dict(validation_fraction=1.0), r'data.validation_fraction must be a number in \[0, 1\)'),
    (dict(eval_split='val'), r"data.eval_split='val' is not valid; valid choices: test, "
                             'validation'),
    (dict(eval_split='validation'), r"data.eval_split='validation' needs "
                                    r'data.validation_fraction > 0'),
])
def test_validate_data_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    data.validate_data_config(make_config(**overrides))


def test_defaults_are_base_config_data():
  from advdef import config_utils
  base = config_utils.base_config().data.to_dict()
  assert set(data.DEFAULTS) == set(base)
  # An absent name means the source's own label (file stem, 'fake'), not base_config's 'digits'.
  assert data.DEFAULTS['name'] == ''
  assert {k: v for k, v in data.DEFAULTS.items() if k != 'name'} == {
      k: v for k, v in base.items() if k != 'name'}
  assert isinstance(data.DEFAULTS['fake_shape'], tuple)
  # Every absent field falls back to a valid default.
  data.validate_data_config({'source': 'fake'})


def test_validate_accepts_config_dict():
  import ml_collections
  config = ml_collections.ConfigDict(dict(data.DEFAULTS))
  data.validate_data_config(config)
  config.source = 'nope'
  with pytest.raises(ValueError, match='data.source'):
    data.load_dataset(config)


# --------------------------------------------------------------------------------------
# TFDS. tfds.testing.mock_data (tfds 4.9.10) does mock tfds.data_source: its default
# policy AUTO falls back to USE_CODE (no metadata files ship for these data sets), which
# fakes examples from the builder's feature spec, so no TensorFlow or files are needed.
# USE_FILES fails here for lack of metadata. The mocked source's __getitems__ is broken
# (a missing argument), which is why tfds_source.py reads records one at a time.


@pytest.mark.parametrize('name, shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_tfds_with_mock_data(tmp_path, name, shape):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=20):
    splits = data.load_dataset(make_config(source='tfds', name=name, data_dir=str(tmp_path),
                                           download=False, num_test=10))
  assert splits.train_images.shape == (20, *shape) and splits.test_images.shape == (10, *shape)
  assert splits.train_images.dtype == np.uint8 and splits.train_labels.dtype == np.int32
  assert splits.info.num_classes == 10 and splits.train_labels.max() < 10
  assert splits.info.mean == tfds_source._TFDS_STATS[name][0]


def test_tfds_not_prepared_offline_message(tmp_path):
  # Real TFDS behaviour (no mock): download=False on an empty data_dir.
  pytest.importorskip('tensorflow_datasets')
  config = make_config(source='tfds', name='mnist', data_dir=str(tmp_path), download=False)
  with pytest.raises(data.DataUnavailableError) as error:
    data.load_dataset(config)
  message = str(error.value)
  assert 'not prepared' in message and 'data.download is False' in message
  assert f'python scripts/prepare_tfds.py --name=mnist --data_dir={tmp_path}' in message
  assert 'pip install tensorflow-cpu' in message and "data.source='npz'" in message


def tensorflow_missing_error():
  """The exception TFDS itself raises when it encodes an image without TensorFlow."""
  tfds = pytest.importorskip('tensorflow_datasets')
  feature = tfds.features.Image(shape=(4, 4, 1))
  try:
    feature.encode_example(np.zeros((4, 4, 1), np.uint8))
  except ModuleNotFoundError as e:
    return e
  pytest.skip('TensorFlow is installed, so its absence cannot be simulated faithfully')


def test_tfds_preparation_without_tensorflow_message(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  real_error = tensorflow_missing_error()

  def failing_data_source(*args, **kwargs):
    raise real_error

  monkeypatch.setattr(tfds, 'data_source', failing_data_source)
  config = make_config(source='tfds', name='cifar10', data_dir=str(tmp_path), download=True)
  with pytest.raises(data.DataUnavailableError, match='TensorFlow is not installed') as error:
    data.load_dataset(config)
  assert f'prepare_tfds.py --name=cifar10 --data_dir={tmp_path}' in str(error.value)
  assert error.value.__cause__ is real_error


def test_tfds_download_offline_message(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  import requests

  def failing_data_source(*args, **kwargs):
    raise requests.exceptions.ConnectionError('Failed to resolve storage.googleapis.com')

  monkeypatch.setattr(tfds, 'data_source', failing_data_source)
  config = make_config(source='tfds', name='mnist', data_dir=str(tmp_path), download=True)
  with pytest.raises(data.DataUnavailableError, match='no network access'):
    data.load_dataset(config)


def test_tfds_unexplained_errors_propagate(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')

  def failing_data_source(*args, **kwargs):
    raise RuntimeError('disk on fire')

  monkeypatch.setattr(tfds, 'data_source', failing_data_source)
  with pytest.raises(RuntimeError, match='disk on fire'):
    data.load_dataset(make_config(source='tfds', name='mnist', data_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------
# Input pipeline.

N = 50  # Pixel values and labels both encode the example index (N <= 255).


@pytest.fixture(scope='module')
def indexed():
  images = np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None], (N, 4, 4, 1))
  return jnp.asarray(images), jnp.arange(N, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=('batch_size', 'crop_padding', 'flip'))
def jit_batch(images, labels, data_key, epoch, step, aug_key, *, batch_size, crop_padding=0,
              flip=False):
  perm = data.epoch_permutation(data_key, epoch, images.shape[0])
  return data.train_batch(images, labels, perm, step, aug_key, batch_size=batch_size,
                          crop_padding=crop_padding, flip=flip)


def test_to_float_numpy_and_jax():
  x = np.array([0, 1, 128, 255], np.uint8)
  np.testing.assert_allclose(data.to_float(x), x / 255, rtol=1e-7)
  assert isinstance(data.to_float(x), np.ndarray) and data.to_float(x)[-1] == 1.0
  # numpy and jax (jitted or not) agree bit for bit on every value.
  every = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(data.to_float(every), jax.jit(data.to_float)(every))
  out = data.to_float(jnp.asarray(x))
  assert out.dtype == jnp.float32 and float(out[-1]) == 1.0
  with pytest.raises(ValueError, match='expects uint8'):
    data.to_float(x.astype(np.float32))


def test_train_batch_under_jit_same_key_same_batch(indexed):
  images, labels = indexed
  key = jax.random.key(0)
  x1, y1 = jit_batch(images, labels, key, 0, 1, key, batch_size=8)
  x2, y2 = jit_batch(images, labels, key, 0, 1, key, batch_size=8)
  assert x1.shape == (8, 4, 4, 1) and x1.dtype == jnp.float32 and y1.dtype == jnp.int32
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  # Images and labels stay aligned through the gather.
  np.testing.assert_array_equal(np.rint(np.asarray(x1[:, 0, 0, 0]) * 255), y1)
  x3, y3 = jit_batch(images, labels, key, 1, 1, key, batch_size=8)
  assert not np.array_equal(y1, y3)


def test_epoch_covers_each_index_at_most_once(indexed):
  images, labels = indexed
  key = jax.random.key(3)
  batch = 8
  steps = data.steps_per_epoch(N, batch)
  assert steps == 6
  seen = np.concatenate([np.asarray(jit_batch(images, labels, key, 2, jnp.int32(s), key,
                                              batch_size=batch)[1]) for s in range(steps)])
  assert len(seen) == steps * batch and len(np.unique(seen)) == len(seen)
  assert seen.min() >= 0 and seen.max() < N
  perm = data.epoch_permutation(key, 2, N)
  assert perm.dtype == jnp.int32
  np.testing.assert_array_equal(seen, np.asarray(perm[:steps * batch]))


def test_crop_shifts_content_exactly():
  b, h, w, p = 16, 5, 6, 2
  x = (jnp.arange(b * h * w, dtype=jnp.float32).reshape(b, h, w, 1) + 1) / 1000
  out = np.asarray(jax.jit(functools.partial(data.augment, crop_padding=p, flip=False))(
      jax.random.key(1), x))
  assert out.shape == x.shape
  padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
  shifts = []
  for i in range(b):
    matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
               if np.array_equal(out[i], padded[i, dy:dy + h, dx:dx + w])]
    assert len(matches) == 1, f'example {i} is not a single shifted window'
    shifts.append(matches[0])
  assert any(s != (p, p) for s in shifts)  # Content actually moved (fixed key).
  assert len(set(shifts)) > 1  # Offsets are per example.


def test_flip_is_exact_mirror():
  x = jax.random.uniform(jax.random.key(0), (32, 3, 4, 2))
  out = np.asarray(data.augment(jax.random.key(2), x, crop_padding=0, flip=True))
  mirrored = [np.array_equal(o, np.asarray(xi)[:, ::-1]) for o, xi in zip(out, x)]
  kept = [np.array_equal(o, np.asarray(xi)) for o, xi in zip(out, x)]
  assert all(m != k for m, k in zip(mirrored, kept))
  assert 0 < sum(mirrored) < len(x)


def test_augment_rejects_raw_keys_and_bad_args():
  x = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match='typed PRNG key'):
    data.augment(jax.random.PRNGKey(0), x, crop_padding=1, flip=False)
  with pytest.raises(ValueError, match='crop_padding'):
    data.augment(jax.random.key(0), x, crop_padding=-1, flip=False)
  with pytest.raises(ValueError, match='exceeds the 5 training examples'):
    data.steps_per_epoch(5, 8)


def test_pipeline_argument_checks(indexed):
  images, labels = indexed
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r'train.batch_size=0 must be an integer >= 1'):
    data.steps_per_epoch(5, 0)
  with pytest.raises(ValueError, match=r'train.augment.flip=1 must be True or False'):
    data.augment(key, jnp.zeros((2, 4, 4, 1)), crop_padding=0, flip=1)
  perm = jnp.arange(4, dtype=jnp.int32)
  with pytest.raises(ValueError, match='batch_size=8 exceeds the permutation length 4'):
    data.train_batch(images, labels, perm, 0, key, batch_size=8)
  with pytest.raises(ValueError, match=r'batch_size=0 must be an integer >= 1'):
    data.train_batch(images, labels, perm, 0, key, batch_size=0)
  with pytest.raises(ValueError, match=r'step_in_epoch=2 is outside \[0, 2\)'):
    data.train_batch(images, labels, perm, 2, key, batch_size=2)


@pytest.mark.parametrize('as_device', [False, True])
def test_eval_batches_pad_and_mask(as_device):
  n, batch = 10, 4
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  labels = np.arange(n, dtype=np.int64)
  if as_device:
    images, labels = jnp.asarray(images), jnp.asarray(labels)
  batches = list(data.eval_batches(images, labels, batch))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (batch, 2, 2, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    assert isinstance(b['image'], jax.Array) == as_device
  mask = np.concatenate([np.asarray(b['mask']) for b in batches])
  assert mask.sum() == n
  np.testing.assert_array_equal(mask, np.arange(12) < n)
  real = np.concatenate([np.asarray(b['label']) for b in batches])[mask]
  np.testing.assert_array_equal(real, np.arange(n))
  pixels = np.concatenate([np.asarray(b['image'])[:, 0, 0, 0] for b in batches])[mask]
  np.testing.assert_array_equal(pixels, data.to_float(np.arange(n, dtype=np.uint8)))
  with pytest.raises(ValueError, match='batch_size'):
    data.eval_batches(images, labels, 0)
