"""The device-resident input pipeline: pure functions meant to run inside `jax.jit`.

The whole data set stays on the device as uint8; `epoch_permutation` orders an epoch,
`train_batch` gathers one batch by index and converts it (`to_float`) and augments it
(`augment`), and `eval_batches` yields fixed-shape, masked batches over a whole split.
`steps_per_epoch` counts the full batches. Models receive float32 in [0, 1] and normalize
themselves with `DatasetInfo.mean` / `std`.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from advdef import validate

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
  validate.check_int('train.batch_size', batch_size, 1)
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
  validate.check_int('train.augment.crop_padding', crop_padding, 0)
  validate.check_bool('train.augment.flip', flip)
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
  validate.check_int('batch_size', batch_size, 1)
  if batch_size > n:
    raise ValueError(f'batch_size={batch_size} exceeds the permutation length {n}.')
  # Only a concrete Python/numpy step can be checked; a traced one has no value yet.
  if isinstance(step_in_epoch, numbers.Integral) and not 0 <= step_in_epoch < n // batch_size:
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
  validate.check_int('batch_size', batch_size, 1)
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
