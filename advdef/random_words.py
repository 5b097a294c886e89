"""Random words and normals from both 32-bit words of each Threefry-2x32 block (SAP, RSE)."""

from __future__ import annotations

import math

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np
from jax import lax


def random_words(keys: jax.Array, count: int, half: int | None = None) -> jax.Array:
  """uint32[k, count]: `count` random words per key from both words of Threefry-2x32 blocks.

  `jax.random.bits` (the partitionable layout) hashes one block per 32-bit word and XORs its
  halves; this uses both halves, so it hashes half as much. The stream comes in tiles of
  2 * half words: tile t is the first words of blocks [t * half, (t + 1) * half) followed by
  their second words. For a fixed `half` (default ceil(count / 2)) the stream is prefix-stable
  in `count`. Halves are concatenated, not interleaved: XLA:CPU ran the interleaved stream
  (stack + reshape) about 1.8x slower in an RSE ResNet-20 gradient pass. Keys of other
  implementations (rbg) use `jax.random.bits`.
  """
  if str(jax.random.key_impl(keys)) != 'threefry2x32':
    return jax.vmap(lambda kk: jax.random.bits(kk, (count,), jnp.uint32))(keys)
  data = jax.random.key_data(keys)                               # uint32[k, 2]
  # Keys [k, 1] against counters [1, m]: the primitive broadcasts them inside its (rolled, on
  # CPU) round loop; passing [k, m] copies of the keys made that loop 4x slower.
  return _tiled_words(data[:, 0:1], data[:, 1:2], jnp.zeros((1, 1), jnp.uint32), count, half)


def row_words(key: jax.Array, rows: jax.Array, count: int,
              half: int | None = None) -> jax.Array:
  """uint32[k, count]: `count` random words for each of k rows, all from one key.

  Row b's stream is `random_words`' layout with b in the high word of the Threefry counter
  (counter (block, b) instead of (block, 0)), so each row's words depend only on the key and
  on b, not on which other rows are drawn. It takes the place of `fold_in(key, b)` per row:
  independent streams without hashing a key per row, and fewer kernels for XLA to compile (a
  vmapped `fold_in` is a rolled Threefry loop of its own; measured, see advdef.defenses).
  Row 0's stream is `random_words(key[None], ...)[0]`. Keys of other implementations (rbg)
  use `jax.random.bits` of `fold_in(key, b)`.

  Args:
    key: one typed key (a scalar key array).
    rows: int[k] row indices b >= 0.
    count, half: as in `random_words`.
  """
  rows = jnp.asarray(rows)
  if str(jax.random.key_impl(key)) != 'threefry2x32':
    return random_words(jax.vmap(jax.random.fold_in, (None, 0))(key, rows), count, half)
  data = jax.random.key_data(key)                                # uint32[2]
  return _tiled_words(data[0].reshape(1, 1), data[1].reshape(1, 1),
                      rows.astype(jnp.uint32)[:, None], count, half)


def _tiled_words(k0, k1, high, count: int, half: int | None) -> jax.Array:
  """The tiled stream of `random_words` for key words k0, k1 and counter high words `high`.

  k0, k1, high: uint32 [k, 1] or [1, 1]. The primitive broadcasts the key words against the
  counters, but both counter words must have one shape.
  """
  half = half or -(-count // 2)
  tiles, last = divmod(count, 2 * half)
  # Blocks needed: `half` per full tile, and for a last partial tile of `last` words, one
  # block per word up to `half` (its first words, then second words from the same blocks).
  num_blocks = tiles * half + min(last, half)
  block = jnp.arange(num_blocks, dtype=jnp.uint32)[None, :]
  low, high = jnp.broadcast_arrays(block, high)
  first, second = jax_random_ext.threefry2x32_p.bind(k0, k1, low, high)
  parts = []
  for t in range(tiles):
    parts += [first[:, t * half:(t + 1) * half], second[:, t * half:(t + 1) * half]]
  if last:
    start = tiles * half
    parts += [first[:, start:], second[:, start:start + max(0, last - half)]]
  return jnp.concatenate(parts, axis=1)


def standard_normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """N(0, 1) samples of `shape`: sqrt(2) * erfinv(v), v on a symmetric grid in (-1, 1).

  `jax.random.normal`'s transform on half the hashing (`_random_words`: both words of every
  Threefry block). v = (2k + 1) 2^-23 - 1 for a uniform 23-bit k, so |v| < 1 and the
  samples are symmetric and finite. float64 keeps `jax.random.normal` (more than 23 bits).
  """
  if jnp.dtype(dtype) == jnp.float64:
    return jax.random.normal(key, shape, dtype)
  words = random_words(key[None], math.prod(shape)).reshape(shape)
  unit = lax.bitcast_convert_type((words >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
  v = 2.0 * unit + (2.0**-23 - 1.0)                              # (2k + 1) 2^-23 - 1
  return (np.float32(np.sqrt(2.0)) * lax.erf_inv(v)).astype(dtype)
