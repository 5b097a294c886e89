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


def project_l2(x_adv: Array, x: Array, eps: Array) -> Array:
  """Scales x_adv - x into the L2 eps ball (with the documented slack), then clips to the box."""
  bound = _eps_floor(eps, x.dtype) * (1.0 - _L2_SLACK)
  # Ball first, then box (the usual order; clipping towards the box, which contains x, only
  # shrinks |delta_i|). Rounding x + s * delta to float32 moves each coordinate by at most
  # half an ulp of a number in [0, 1], i.e. 2^-25, so the realised norm can exceed the
  # intended one by up to sqrt(n) * 2^-25 (which matters for tiny eps). The second pass
  # re-measures it and, where it is over the bound, aims that much lower; scaling by s <= 1
  # keeps x + s * delta in the box (convexity), so its re-clip is only a guard.
  rounding = math.sqrt(math.prod(x.shape[1:])) * 2.0**-25
  for target in (bound, jnp.maximum(bound - rounding, 0.0)):
    delta = x_adv - x
    norm = flat_l2(delta)
    scale = jnp.where(norm > bound, target / jnp.maximum(norm, TINY), 1.0)
    x_adv = jnp.clip(x + delta * bcast(scale, x), 0.0, 1.0)
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
