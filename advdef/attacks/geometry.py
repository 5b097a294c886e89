"""Geometry shared by the attacks, and their shared hyperparameter checks.

Norms, steepest-ascent directions, exact projections onto the eps ball intersected with the
[0, 1] box (see "Exact constraints" in the package docstring), random starts, perturbation
norms, the per-example "more adversarial" order; and the checks every attack runs on its
hyperparameters before any compute (thin wrappers over `advdef.validate`, which names the
field `'<attack>.<param>'`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from advdef import validate
from advdef.attacks import losses

Array = losses.Array

NORMS = ('linf', 'l2')
EOT_AVERAGES = ('loss', 'logits', 'probs')

# L2 results are kept this far (relative) inside the ball, so that a caller who recomputes
# the norm with another summation order (numpy pairwise, float64) still finds it <= eps.
_L2_SLACK = 2.0**-16
# Guards divisions by norms of perturbations / gradients that may be exactly zero.
TINY = 1e-12

# ----------------------------------------------------------------------------------------
# Hyperparameter checks. Values are checked concretely; tracers (eps under jit) pass.
# ----------------------------------------------------------------------------------------


def check_optional(field: str, value: Any, **bounds) -> None:
  """`validate.check_hyperparameter` for an optional hyperparameter: None passes.

  Args:
    field: '<attack>.<param>', e.g. 'pgd.step_size'.
    value: None, or a number that must satisfy `bounds` (check_hyperparameter's keywords).
  """
  if value is not None:
    validate.check_hyperparameter(field, value, **bounds)


def check_static_int(field: str, value: Any, minimum: int = 1) -> None:
  """Checks a structural integer (steps, restarts, queries, ...): an integer >= minimum.

  It sets loop bounds and shapes, so it must be a static Python (or numpy) integer, never a
  JAX array; the error says so.
  """
  try:
    validate.check_int(field, value, minimum)
  except ValueError as e:
    raise ValueError(f'{e} (a static Python value)') from None


def check_norm(attack: str, norm: Any, supported: tuple[str, ...] = NORMS) -> None:
  """Checks `norm` is a known norm, then that this attack supports it."""
  validate.check_choice(f'{attack}.norm', norm, NORMS)
  if norm not in supported:
    raise ValueError(f'{attack}.norm={norm!r} is not supported by this attack; valid choices: '
                     f'{", ".join(supported)}')


def check_eot(attack: str, eot_samples: Any, eot_average: Any) -> None:
  check_static_int(f'{attack}.eot_samples', eot_samples)
  validate.check_choice(f'{attack}.eot_average', eot_average, EOT_AVERAGES)


# ----------------------------------------------------------------------------------------
# Norms, directions, exact projections, random starts.
# ----------------------------------------------------------------------------------------


def bcast(v: Array, like: Array) -> Array:
  """Reshapes a per-example [B] array to [B, 1, ..., 1] (rank promotion is strict)."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def flat_l2(v: Array) -> Array:
  """float32[B]: the L2 norm of each example of v float32[B, ...]."""
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1))


def _eps_floor(eps: Array, dtype) -> Array:
  """The largest float below float(eps) in `dtype` (0 stays 0).

  Clipping to this value instead of float32(eps) keeps the realised perturbation <= eps
  even when it is compared with the (possibly smaller) float64 value of eps.
  """
  eps = jnp.asarray(eps, dtype)
  return jnp.nextafter(eps, jnp.zeros_like(eps))


def project_linf(x_adv: Array, x: Array, eps: Array) -> Array:
  """The point of the L-inf eps ball around x and the [0, 1] box nearest to x_adv, exactly."""
  e = _eps_floor(eps, x.dtype)
  x_adv = jnp.clip(x_adv, jnp.maximum(x - e, 0.0), jnp.minimum(x + e, 1.0))
  # fl(x + e) can round outwards, so the float32 difference may exceed e by half an ulp;
  # one ulp back towards x fixes it (a second pass covers binade edges). x is in the box,
  # so moving towards it never leaves the box.
  for _ in range(2):
    x_adv = jnp.where(jnp.abs(x_adv - x) > e, jnp.nextafter(x_adv, x), x_adv)
  return x_adv


def _l2_box_scale(v: Array, x: Array, radius: Array, inside: Array) -> Array:
  """float[B]: the s in [0, 1] with ||clip(s * v, -x, 1 - x)||_2 = radius, per example.

  v, x: float[B, n]; radius: float[B]; inside: bool[B], examples already feasible at s = 1
  (they get s = 1 and never iterate). With knee_i = (1 - x_i) / v_i for v_i > 0 and
  -x_i / v_i for v_i < 0 (+inf for v_i = 0), coordinate i is clipped to its face c_i
  (1 - x_i or -x_i) for s >= knee_i and free (s * v_i) below, so
  f(s) = ||clip(s v, -x, 1 - x)||^2 = C(s) + s^2 F(s),  C(s) = sum_{knee_i <= s} c_i^2,
  F(s) = sum_{knee_i > s} v_i^2, continuous and non-decreasing. Starting from s = 0, each
  iteration solves the quadratic of the current clipped set exactly,
  s <- sqrt((radius^2 - C(s)) / F(s)). Coordinates that clip between s and the new value are
  counted as free, which overstates f there, so every iterate is a lower bound on the root
  (and a feasible point); an iterate that clips nothing new is the root itself. Hence s rises
  monotonically and stops after at most n + 1 distinct clipped sets (the loop bound); in
  practice 2-6 iterations (<= 15 for adversarially spread knees). The first iterate,
  radius / ||v||, is the plain ball scaling. A Newton-like active-set method (cf. Michelot's
  for the simplex); unlike the sorted breakpoint solve it needs no sort.
  """
  n = v.shape[1]
  pos, neg = v > 0, v < 0
  safe = jnp.where(pos | neg, v, 1.0)
  knee = jnp.where(pos, (1.0 - x) / safe, jnp.where(neg, -x / safe, jnp.inf))
  face_sq = jnp.square(jnp.where(pos, 1.0 - x, x))  # c_i^2 (unused where v_i = 0)
  free_sq = jnp.square(v)
  radius_sq = jnp.square(radius)

  def body(state):
    i, s, _ = state
    clipped = knee <= s[:, None]
    fixed = jnp.sum(jnp.where(clipped, face_sq, 0.0), axis=1)
    free = jnp.sum(jnp.where(clipped, 0.0, free_sq), axis=1)
    # free == 0: nothing left to scale; f is flat from here on, so s = 1 is the answer.
    root = jnp.sqrt(jnp.maximum(radius_sq - fixed, 0.0) / jnp.where(free > 0, free, 1.0))
    s_new = jnp.where(free > 0, root, 1.0)
    # max: float rounding must not undo progress (the exact sequence is non-decreasing).
    s_new = jnp.maximum(s, jnp.minimum(s_new, 1.0))
    return i + 1, s_new, s_new > s

  s0 = jnp.where(inside, 1.0, 0.0).astype(v.dtype)
  _, s, _ = lax.while_loop(lambda st: (st[0] < n + 2) & jnp.any(st[2]), body,
                           (jnp.asarray(0), s0, ~inside))
  return s


def project_l2(x_adv: Array, x: Array, eps: Array) -> Array:
  """The point of the L2 ball of radius r around x and the [0, 1] box nearest to x_adv.

  r = eps * (1 - 2**-16) (precisely: the float32 number just below float32(eps), times
  1 - `_L2_SLACK`), so that the result's L2 distance to x, as measured by `flat_l2` in float32
  (and by numpy in float64, with the slack absorbing the summation order), is <= eps.

  This is the Euclidean projection onto the intersection {||d||_2 <= r} and {x + d in [0, 1]},
  not "scale into the ball, then clip" (which is only the projection when the box does not
  bind, and otherwise ends farther from x_adv and strictly inside the ball). With
  v = x_adv - x, the KKT conditions give d = clip(v / (1 + lam), -x, 1 - x) with lam = 0 when
  ||clip(v, -x, 1 - x)|| <= r (then the result is clip(x_adv, 0, 1), bit for bit; in
  particular a point already inside both sets is returned unchanged), and otherwise the unique
  lam > 0 with ||d|| = r. The scale s = 1 / (1 + lam) is found per example by the finite
  active-set iteration of `_l2_box_scale` (exact up to float32 rounding of its sums, no sort,
  no fixed bisection count), and the result is clip(x + s * v, 0, 1).

  Float32 guarantee: rounding x + s * v moves each coordinate by up to half an ulp of a
  number in [0, 1] (2^-25), and s carries the float32 error of two sums (~1e-7 relative), so
  the realised norm can land just above r. It is therefore re-measured with `flat_l2`, and
  where it exceeds r the perturbation is scaled to sqrt(n) * 2^-25 below r, the most that
  rounding can add back (n = H*W*C; for eps below that this returns x, as eps = 0 does).
  Scaling by < 1 keeps x + s * delta in the box (convexity), so the re-clip is only a guard;
  examples not over r are untouched. So the result is the exact projection onto radius r up
  to float32 rounding, except that an example whose rounded norm came out above r ends up to
  sqrt(n) * 2^-25 (1.7e-6 for 32x32x3) inside it instead: each coordinate is within ~1e-6 of
  the float64 projection (tests/projection_test.py checks 1e-5; measured <= 3.4e-7).

  Cost, jit, float32[32, 32, 32, 3], eps = 0.5, this 2-core CPU shared with other jobs (load
  ~7), 300 interleaved repeats with block_until_ready: median 2.1 ms (min 0.9 ms) when a
  PGD-like step makes the box bind, 1.8 ms (min 1.2) for a step of 5 * eps, 2.7 ms (min 1.1)
  when the box never binds, against 0.6-1.0 ms (min 0.3-0.4) for the former ball-then-clip:
  about 2-3x, i.e. ~1-2 ms per call, small next to a model's forward and backward pass in
  the attack step. The active-set loop takes 2-4 iterations on such inputs (a sorted
  breakpoint solve would be exact in one pass, but XLA's CPU sort of [32, 3072] alone costs
  ~20 ms, and a 40-step bisection ~11 ms).

  Args:
    x_adv: float32[B, ...], any values.
    x: float32[B, ...] in [0, 1], the centre.
    eps: scalar or float32[B], may be traced; >= 0.

  Returns:
    float32[B, ...] in [0, 1] with flat_l2(result - x) <= eps.
  """
  batch = x.shape[0]
  n = math.prod(x.shape[1:])
  bound = jnp.broadcast_to(_eps_floor(eps, x.dtype) * (1.0 - _L2_SLACK), (batch,))
  boxed = jnp.clip(x_adv, 0.0, 1.0)
  inside = flat_l2(boxed - x) <= bound
  v = x_adv - x
  s = _l2_box_scale(v.reshape(batch, n), x.reshape(batch, n), bound, inside)
  x_adv = jnp.where(bcast(inside, x), boxed, jnp.clip(x + bcast(s, x) * v, 0.0, 1.0))
  rounding = math.sqrt(n) * 2.0**-25
  delta = x_adv - x
  norm = flat_l2(delta)
  scale = jnp.maximum(bound - rounding, 0.0) / jnp.maximum(norm, TINY)
  x_adv = jnp.where(bcast(norm > bound, x), jnp.clip(x + delta * bcast(scale, x), 0.0, 1.0), x_adv)
  return x_adv


def project(x_adv: Array, x: Array, eps: Array, norm: str) -> Array:
  return project_linf(x_adv, x, eps) if norm == 'linf' else project_l2(x_adv, x, eps)


def ascent_direction(grad: Array, norm: str) -> Array:
  """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
  if norm == 'linf':
    return jnp.sign(grad)
  return grad / bcast(jnp.maximum(flat_l2(grad), TINY), grad)


def random_init(key: Array, x: Array, eps: Array, norm: str) -> Array:
  """A uniform random point of the eps ball around x, projected into the box."""
  if norm == 'linf':
    noise = jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    return project_linf(x + eps * noise, x, eps)
  dir_key, radius_key = jax.random.split(key)
  direction = jax.random.normal(dir_key, x.shape, x.dtype)
  direction = direction / bcast(jnp.maximum(flat_l2(direction), TINY), x)
  dim = math.prod(x.shape[1:])
  # Radius u^(1/d) makes the point uniform in the ball (not just on the sphere).
  radius = eps * jax.random.uniform(radius_key, x.shape[:1], x.dtype) ** (1.0 / dim)
  return project_l2(x + direction * bcast(radius, x), x, eps)


# ----------------------------------------------------------------------------------------
# Per-example success and order.
# ----------------------------------------------------------------------------------------


def misclassified(logits: Array, y: Array) -> Array:
  """bool[B]: argmax of logits float32[B, K] differs from y int32[B]."""
  return jnp.argmax(logits, axis=-1) != y


def better(loss_a: Array, mis_a: Array, loss_b: Array, mis_b: Array) -> Array:
  """Whether a is more adversarial than b: misclassified first, then the larger loss."""
  return (mis_a & ~mis_b) | ((mis_a == mis_b) & (loss_a > loss_b))


def perturbation_norms(x: Array, x_adv: Array, norm: str) -> Array:
  """Per-example perturbation size ||x_adv - x||.

  Args:
    x, x_adv: float32[B, H, W, C].
    norm: 'linf' (max |delta|) or 'l2'.

  Returns:
    float32[B] in pixel units.
  """
  check_norm('perturbation_norms', norm)
  delta = (jnp.asarray(x_adv) - jnp.asarray(x)).reshape(x.shape[0], -1)
  if norm == 'linf':
    return jnp.max(jnp.abs(delta), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(delta), axis=1))


def relative_perturbation_norms(x: Array, x_adv: Array, norm: str) -> Array:
  """The JumpReLU paper's "Rel. Noise": ||x_adv - x|| / ||x|| per example.

  L-inf: max|delta| / max|x|; L2: ||delta||_2 / ||x||_2. An all-zero x gives inf (or nan
  for a zero delta).

  Args:
    x, x_adv: float32[B, H, W, C].
    norm: 'linf' or 'l2'.

  Returns:
    float32[B], dimensionless.
  """
  check_norm('relative_perturbation_norms', norm)
  zero = jnp.zeros_like(jnp.asarray(x))
  return perturbation_norms(x, x_adv, norm) / perturbation_norms(zero, x, norm)
