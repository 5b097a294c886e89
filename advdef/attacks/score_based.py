"""The Square Attack (Andriushchenko et al. 2020): a score-based attack, no gradients.

Random search on the margin, L-inf and L2; `square_impl` (no checks, with a `done` mask) is
also the last stage of `autoattack_standard`.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from advdef import validate
from advdef.attacks import geometry
from advdef.attacks import gradient
from advdef.attacks import losses

Array = losses.Array
LogitsFn = losses.LogitsFn


def _square_p(p_init: Array, i: Array, queries: int) -> Array:
  """The piecewise-constant schedule of the square's area fraction p.

  The iteration is rescaled to a 10 000-query budget; p halves after 10, 50, 200, 500, 1000,
  2000, 4000, 6000 and 8000 (rescaled) iterations.
  """
  t = jnp.floor(i.astype(jnp.float32) * (10000.0 / queries))
  boundaries = jnp.asarray([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000], jnp.float32)
  halvings = jnp.sum((t > boundaries).astype(jnp.float32))
  return p_init * 0.5**halvings


def _window_mask(rows: Array, cols: Array, side: Array, like: Array) -> Array:
  """bool[B, H, W, 1]: the side x side square at per-example top-left (rows, cols)."""
  h = jnp.arange(like.shape[1]).reshape(1, -1, 1, 1)
  w = jnp.arange(like.shape[2]).reshape(1, 1, -1, 1)
  r, c = geometry.bcast(rows, like), geometry.bcast(cols, like)
  return (h >= r) & (h < r + side) & (w >= c) & (w < c + side)


def _bump(side: Array, size: int) -> Array:
  """The L2 Square Attack's update pattern on a size x size grid (zero outside side x side).

  Top half: a stack of centred rectangles, rectangle k weighted 1 / (k + 1)^2, i.e. a
  pixel at Chebyshev distance d from the centre gets sum_{k=d}^{K-1} 1/(k+1)^2; bottom half:
  the same with the opposite sign. Each half has unit L2 norm, then the whole has.
  `side` may be traced.
  """
  harmonic = jnp.concatenate(
      [jnp.zeros(1), jnp.cumsum(1.0 / jnp.arange(1, size + 2, dtype=jnp.float32) ** 2)])
  u = jnp.arange(size).reshape(-1, 1)
  v = jnp.arange(size).reshape(1, -1)
  inside = (u < side) & (v < side)
  rows_top = side // 2

  def rectangles(uu, rows):
    dist = jnp.maximum(jnp.abs(uu - rows // 2), jnp.abs(v - side // 2))
    count = jnp.maximum(rows // 2, side // 2) + 1
    return harmonic[count] - harmonic[jnp.clip(dist, 0, size + 1)]

  def unit(p):
    return p / jnp.maximum(jnp.sqrt(jnp.sum(p * p)), geometry.TINY)

  top = unit(jnp.where(inside & (u < rows_top), rectangles(u, rows_top), 0.0))
  bottom = unit(jnp.where(inside & (u >= rows_top),
                          -rectangles(u - rows_top, side - rows_top), 0.0))
  return unit(top + bottom)


def _place(pattern: Array, rows: Array, cols: Array, transpose: Array, like: Array) -> Array:
  """Places a [S, S] pattern at per-example offsets; returns float32[B, H, W, 1]."""
  size = pattern.shape[0]
  h = jnp.arange(like.shape[1]).reshape(1, -1, 1)
  w = jnp.arange(like.shape[2]).reshape(1, 1, -1)
  u = h - rows.reshape(-1, 1, 1)
  v = w - cols.reshape(-1, 1, 1)
  valid = (u >= 0) & (u < size) & (v >= 0) & (v < size)
  uc, vc = jnp.clip(u, 0, size - 1), jnp.clip(v, 0, size - 1)
  t = transpose.reshape(-1, 1, 1)
  values = jnp.where(t, pattern[vc, uc], pattern[uc, vc])
  return jnp.where(valid, values, 0.0)[..., None]


def square_impl(logits_fn, key, x, y, eps, p_init, *, norm, queries, eot_samples, done=None):
  """`square` without the checks; `done` bool[B] marks examples to leave alone.

  Returns (x_adv, margin float32[B] of x_adv).
  """
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  eps = jnp.asarray(eps, x.dtype)
  batch, height, width, channels = x.shape
  size = min(height, width)
  objective = gradient.make_objective(logits_fn, losses.margin, eot_samples, 'loss')
  clean_key, init_key, loop_key = jax.random.split(key, 3)
  score = lambda x_, k: objective(x_, y, k)[0]

  clean_margin = score(x, clean_key)
  done0 = clean_margin > 0
  if done is not None:
    done0 = done0 | done
  k_sign, k_flip, k_eval = jax.random.split(init_key, 3)
  if norm == 'linf':
    # Vertical stripes of +-eps: one sign per (column, channel).
    stripes = jax.random.rademacher(k_sign, (batch, 1, width, channels), x.dtype)
    x_init = geometry.project_linf(x + eps * stripes, x, eps)
  else:
    # A 5 x 5 grid of bumps with random signs per channel and random orientation.
    block = max(size // 5, 1)
    pattern = _bump(jnp.asarray(block), size)
    count = min(5, size // block)
    start_h, start_w = (height - count * block) // 2, (width - count * block) // 2
    signs = jax.random.rademacher(k_sign, (count * count, batch, 1, 1, channels), x.dtype)
    flips = jax.random.bernoulli(k_flip, 0.5, (count * count, batch))
    delta = jnp.zeros_like(x)
    for a in range(count):
      for b in range(count):
        n = a * count + b
        rows = jnp.full((batch,), start_h + a * block)
        cols = jnp.full((batch,), start_w + b * block)
        delta = delta + _place(pattern, rows, cols, flips[n], x) * signs[n]
    delta = delta * geometry.bcast(eps / jnp.maximum(geometry.flat_l2(delta), geometry.TINY), x)
    x_init = geometry.project_l2(x + delta, x, eps)
  init_margin = score(x_init, k_eval)
  x_best = jnp.where(geometry.bcast(done0, x), x, x_init)
  margin_best = jnp.where(done0, clean_margin, init_margin)

  def cond(state):
    i, _, margin_cur = state
    return (i < queries) & jnp.any((margin_cur <= 0) & ~done0)

  def body(state):
    i, x_cur, margin_cur = state
    k_pos, k_pos2, k_sign, k_flip, k_eval = jax.random.split(jax.random.fold_in(loop_key, i), 5)
    p = _square_p(p_init, i, queries)
    delta = x_cur - x
    if norm == 'linf':
      side = jnp.clip(jnp.round(jnp.sqrt(p * height * width)), 1, size - 1).astype(jnp.int32)
      rows = jax.random.randint(k_pos, (batch,), 0, height - side + 1)
      cols = jax.random.randint(k_pos2, (batch,), 0, width - side + 1)
      window = _window_mask(rows, cols, side, x)
      signs = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
      x_new = geometry.project_linf(x + jnp.where(window, eps * signs, delta), x, eps)
      # A square that changes nothing wastes a query: flip its signs (box permitting).
      unchanged = jnp.all(jnp.where(window, x_new == x_cur, True), axis=(1, 2, 3))
      x_flip = geometry.project_linf(x + jnp.where(window, -eps * signs, delta), x, eps)
      x_new = jnp.where(geometry.bcast(unchanged, x), x_flip, x_new)
    else:
      side = jnp.clip(jnp.round(jnp.sqrt(p * height * width)), 1, size - 1).astype(jnp.int32)
      k_r1, k_c1 = jax.random.split(k_pos)
      k_r2, k_c2 = jax.random.split(k_pos2)
      rows1 = jax.random.randint(k_r1, (batch,), 0, height - side + 1)
      cols1 = jax.random.randint(k_c1, (batch,), 0, width - side + 1)
      rows2 = jax.random.randint(k_r2, (batch,), 0, height - side + 1)
      cols2 = jax.random.randint(k_c2, (batch,), 0, width - side + 1)
      window1 = _window_mask(rows1, cols1, side, x)
      window2 = _window_mask(rows2, cols2, side, x)
      channel_norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))
      norm_window1 = channel_norm(jnp.where(window1, delta, 0.0))
      norm_windows = channel_norm(jnp.where(window1 | window2, delta, 0.0))
      norm_image2 = geometry.bcast(jnp.sum(jnp.square(delta.reshape(batch, -1)), axis=1), x)
      flips = jax.random.bernoulli(k_flip, 0.5, (batch,))
      bump = _place(_bump(side, size), rows1, cols1, flips, x)
      signs = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
      # New window content: a fresh bump plus the old content's direction, rescaled to use
      # the budget left in the image plus the mass freed in both windows.
      new = bump * signs + jnp.where(window1, delta, 0.0) / (norm_window1 + 1e-10)
      budget = jnp.sqrt(jnp.maximum(eps**2 - norm_image2, 0.0) / channels + norm_windows**2)
      new = new / jnp.maximum(channel_norm(new), geometry.TINY) * budget
      delta_new = jnp.where(window1, new, jnp.where(window2, 0.0, delta))
      delta_new = delta_new * geometry.bcast(
          eps / jnp.maximum(geometry.flat_l2(delta_new), geometry.TINY), x)
      x_new = geometry.project_l2(x + delta_new, x, eps)
    margin_new = score(x_new, k_eval)
    accept = (margin_new > margin_cur) & (margin_cur <= 0) & ~done0
    return (i + 1, jnp.where(geometry.bcast(accept, x), x_new, x_cur),
            jnp.where(accept, margin_new, margin_cur))

  _, x_adv, margin_best = lax.while_loop(cond, body, (jnp.asarray(1), x_best, margin_best))
  return lax.stop_gradient(x_adv), margin_best


def square(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
           norm: str = 'linf', queries: int = 5000, p_init: float = 0.8,
           eot_samples: int = 1) -> Array:
  """Square Attack (Andriushchenko et al. 2020): score-based random search, no gradients.

  Maximises the margin `max_{j!=y} z_j - z_y` on the logits. L-inf: vertical-stripe
  initialisation, then each query sets a random square (side sqrt(p * H * W), p from
  `p_init` halved on the authors' schedule rescaled to 10 000 queries) to +-eps per
  channel. L2: a grid of pseudo-Gaussian bumps, then each query moves perturbation mass
  from a second square into a new bump in the first. An update is kept only if it raises
  the margin; examples stop updating once misclassified (masking; the `lax.while_loop`
  exits when every example is misclassified or the budget is spent). Windows are drawn
  independently per example.

  Args:
    logits_fn, key, x, y: as for `pgd`. Needs H, W >= 2.
    eps: budget (traced).
    norm: 'linf' or 'l2'.
    queries: budget: the initial point plus `queries - 1` updates per example (one more
      forward pass checks the clean point).
    p_init: initial square-area fraction (traced), 0.8 as in AutoAttack.
    eot_samples: for a stochastic model, every margin is the mean over this many draws
      (the acceptance rule of AutoAttack's paper for randomised defenses).

  Returns:
    x_adv float32[B, H, W, C] inside the eps ball and the box.
  """
  validate.check_hyperparameter('square.eps', eps, strict=False, scalar=True)
  validate.check_hyperparameter('square.p_init', p_init, minimum=0.0, strict=True, maximum=1.0,
                                scalar=True)
  geometry.check_static_int('square.queries', queries)
  geometry.check_static_int('square.eot_samples', eot_samples)
  geometry.check_norm('square', norm)
  x_adv, _ = square_impl(logits_fn, key, x, y, eps, p_init, norm=norm, queries=queries,
                          eot_samples=eot_samples)
  return x_adv
