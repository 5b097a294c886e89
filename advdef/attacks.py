"""Adversarial attacks in [0, 1] pixel space, written for JAX transformations.

Every attack has the project-wide role signature

    attack(logits_fn, key, x, y, **hparams) -> x_adv

* `logits_fn(x, key) -> float32[B, K]` is the model as the attacker sees it. `x` is
  float32[B, H, W, C] in [0, 1]; `key` drives the model's own randomness (SAP masks, RSE
  noise). Deterministic models ignore it. Input normalisation lives inside `logits_fn`.
* `key` is a typed key (`jax.random.key`). An attack derives every random number it needs,
  including the keys it hands to `logits_fn`, from this key alone (split / fold_in, never
  reused), so attack randomness is independent of whatever keys the evaluator uses.
* `y` is int32[B], the true labels. All attacks are untargeted.
* Every epsilon is in [0, 1] pixel units. Fixed-budget attacks return points that lie
  exactly inside the epsilon ball and the [0, 1] box (see "Exact constraints" below).
* Numeric hyperparameters (eps, step sizes, learning rates, overshoot, ...) are traced:
  changing them does not recompile (switching an optional one between None and a number
  does, since that changes the argument structure). Structural ones (steps, restarts, norm,
  loss, queries, eot_samples, ...) are static Python values; bind them with
  `functools.partial` before `jax.jit`. Library functions are not jitted themselves ("jit
  at the top").
* Loops run inside the trace (`lax.fori_loop` / `lax.while_loop`), so there is no host sync
  per step, and outputs carry `lax.stop_gradient`.
* Invalid hyperparameters raise `ValueError` naming the field before any compute. Checks
  on values are skipped for tracers (e.g. eps under `jax.jit`).

Components
----------
Losses (per example, `loss(logits, y) -> float32[B]`). Sign convention: LARGER = MORE
ADVERSARIAL; attacks maximise them, and `margin > 0` exactly when the example is
misclassified.
  cross_entropy, margin (C&W: max_{j!=y} z_j - z_y), dlr (Croce & Hein 2020),
  dlr_targeted; registry `LOSSES` (aliases 'ce' and 'cw'), `get_loss`.
Fixed-budget attacks (eps ball):
  fgsm             single step, L-inf (FGSM) or L2 (FGM), optional random start.
  pgd              L-inf / L2, random start, vectorised restarts, best-iterate tracking.
  apgd             Auto-PGD (Croce & Hein 2020), CE or DLR loss, L-inf / L2, restarts.
  apgd_targeted    APGD-T: targeted DLR against the top `num_target_classes` classes.
  square           Square Attack (Andriushchenko et al. 2020), score based, L-inf / L2.
  autoattack_standard, autoattack_rand   AutoAttack-style suites (per-example worst case).
Minimum-perturbation attacks (no eps ball; report norms with `perturbation_norms`):
  cw_l2            Carlini & Wagner L2 with binary search over c (optional eps projection).
  deepfool         DeepFool, L2 and L-inf, top-k candidate classes.
  ifgsm_min        The JumpReLU paper's iterative FGSM that stops per example once fooled.
Adaptive-attack tools:
  eot_logits_fn    EOT over a stochastic model (mean logits or log of mean softmax);
                   attacks also take `eot_samples` / `eot_average` (default: mean of
                   the per-draw losses), vectorised with vmap inside the compiled loop.
                   Success tests (best iterate, restarts, early stops) then use the
                   draws' mean logits, not one lucky draw (cf. AutoAttack PRs #104/#105).
  fixed_randomness Freezes the model's randomness to one key (the literature's check).
  transfer_attack  Crafts on a source model, ignoring the attacked (target) model.
  BPDA             Nothing to do here: the defense exposes its surrogate backward pass
                   (e.g. `jax.custom_vjp`, or `h + stop_gradient(f(h) - h)`) inside its
                   `logits_fn`, and every gradient attack differentiates whatever
                   `logits_fn` it is given, so it follows the surrogate.
Registry and helpers:
  ATTACKS, ATTACK_NORMS, get_attack, perturbation_norms, relative_perturbation_norms.

Exact constraints
-----------------
L-inf results satisfy `|x_adv - x| <= eps` elementwise when the difference and the
comparison are done in float32 (numpy or JAX) and also against the float64 value of eps:
the attack clips to the float32 number just below float32(eps) and nudges any coordinate
whose float32 difference still rounds above it one ulp back towards x. L2 results are
scaled to at most `eps * (1 - 2**-16)`; the slack absorbs the rounding of the difference and
of the norm's summation (numpy's pairwise order, float64, ...). The realised norm is then
re-measured once and, where the float32 rounding of `x + delta` pushed it over, scaled to
`sqrt(n) * 2**-25` below that bound, the most that rounding can add back (n = H * W * C).

Example
-------
    import functools, jax
    from advdef import attacks

    logits_fn = lambda x, key: model.apply(variables, x, rngs={'defense': key})
    attack = jax.jit(functools.partial(
        attacks.pgd, logits_fn, steps=100, restarts=10, norm='linf', loss='margin',
        eot_samples=10))
    key = jax.random.key(0)
    x_adv = attack(key, x, y, eps=8 / 255)   # eps is traced: a new eps does not recompile
    robust_acc = (logits_fn(x_adv, eval_key).argmax(-1) == y).mean()

    # The same by name, e.g. from a config:
    apgd = attacks.get_attack('apgd')
    x_adv = jax.jit(functools.partial(apgd, logits_fn, loss='dlr', steps=100))(
        key, x, y, eps=0.3)
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
LogitsFn = Callable[[Array, Array], Array]
LossFn = Callable[[Array, Array], Array]
AttackFn = Callable[..., Array]

NORMS = ('linf', 'l2')
EOT_AVERAGES = ('loss', 'logits', 'probs')

# L2 results are kept this far (relative) inside the ball, so that a caller who recomputes
# the norm with another summation order (numpy pairwise, float64) still finds it <= eps.
_L2_SLACK = 2.0**-16
# Guards divisions by norms of perturbations / gradients that may be exactly zero.
_TINY = 1e-12

__all__ = [
    'ATTACKS', 'ATTACK_NORMS', 'EOT_AVERAGES', 'LOSSES', 'NORMS', 'apgd', 'apgd_targeted',
    'autoattack_rand', 'autoattack_standard', 'cross_entropy', 'cw_l2', 'deepfool', 'dlr',
    'dlr_targeted', 'eot_logits_fn', 'fgsm', 'fixed_randomness', 'get_attack', 'get_loss',
    'ifgsm_min', 'margin', 'perturbation_norms', 'pgd', 'relative_perturbation_norms',
    'square', 'transfer_attack',
]


# ----------------------------------------------------------------------------------------
# Losses. Per example, larger = more adversarial.
# ----------------------------------------------------------------------------------------


def _label_logit(logits: Array, y: Array) -> Array:
  return jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]


def _max_other_logit(logits: Array, y: Array) -> Array:
  is_label = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.bool_)
  return jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


def cross_entropy(logits: Array, y: Array) -> Array:
  """Softmax cross-entropy of the true label, `logsumexp(z) - z_y`.

  Args:
    logits: float32[B, K].
    y: int32[B] true labels.

  Returns:
    float32[B], >= 0; larger = more adversarial.
  """
  return jax.nn.logsumexp(logits, axis=-1) - _label_logit(logits, y)


def margin(logits: Array, y: Array) -> Array:
  """Carlini-Wagner margin `max_{j != y} z_j - z_y`.

  Args:
    logits: float32[B, K], K >= 2.
    y: int32[B] true labels.

  Returns:
    float32[B] in logit units; > 0 exactly when the example is misclassified (ties count as
    correct). Larger = more adversarial.
  """
  return _max_other_logit(logits, y) - _label_logit(logits, y)


def dlr(logits: Array, y: Array) -> Array:
  """Difference-of-logits-ratio loss (Croce & Hein 2020), untargeted.

  `-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)` with z_pi the logits sorted in
  decreasing order. It is the margin divided by a scale, so it is invariant to shifting and
  rescaling the logits, and > 0 exactly when the example is misclassified.

  Args:
    logits: float32[B, K], K >= 3.
    y: int32[B] true labels.

  Returns:
    float32[B]; larger = more adversarial.

  Raises:
    ValueError: if K < 3.
  """
  if logits.shape[-1] < 3:
    raise ValueError(f'dlr loss needs at least 3 classes, got logits of shape {logits.shape}')
  top = jnp.sort(logits, axis=-1)
  scale = top[:, -1] - top[:, -3] + 1e-12
  return margin(logits, y) / scale


def dlr_targeted(logits: Array, y: Array, target: Array) -> Array:
  """Targeted DLR loss (Croce & Hein 2020): `(z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4)/2)`.

  Args:
    logits: float32[B, K], K >= 4.
    y: int32[B] true labels.
    target: int32[B] target classes (should differ from y).

  Returns:
    float32[B]; larger = closer to (or further into) the target class.

  Raises:
    ValueError: if K < 4.
  """
  if logits.shape[-1] < 4:
    raise ValueError(
        f'dlr_targeted loss needs at least 4 classes, got logits of shape {logits.shape}')
  top = jnp.sort(logits, axis=-1)
  scale = top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + 1e-12
  return (_label_logit(logits, target) - _label_logit(logits, y)) / scale


LOSSES: dict[str, LossFn] = {
    'cross_entropy': cross_entropy,
    'margin': margin,
    'dlr': dlr,
}
_LOSS_ALIASES = {'ce': 'cross_entropy', 'cw': 'margin'}


def get_loss(name: str) -> LossFn:
  """Looks up a per-example loss by name ('cross_entropy'/'ce', 'margin'/'cw', 'dlr').

  Raises:
    ValueError: listing the valid names if `name` is unknown.
  """
  canonical = _LOSS_ALIASES.get(name, name)
  if canonical not in LOSSES:
    valid = sorted(LOSSES) + sorted(_LOSS_ALIASES)
    raise ValueError(f'loss must be one of {valid}, got {name!r}')
  return LOSSES[canonical]


# ----------------------------------------------------------------------------------------
# Validation. Runs on concrete Python / numpy / jax values; tracers are skipped.
# ----------------------------------------------------------------------------------------


def _concrete(value: Any) -> Optional[np.ndarray]:
  if value is None or isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def _check_real(attack: str, name: str, value: Any, *, minimum: float = 0.0,
                strict: bool = False, maximum: Optional[float] = None) -> None:
  """Checks a numeric hyperparameter: a finite real scalar >= minimum (> if strict)."""
  arr = _concrete(value)
  if arr is None:
    return
  ok = arr.ndim == 0 and (np.issubdtype(arr.dtype, np.floating) or
                          np.issubdtype(arr.dtype, np.integer))
  if ok:
    v = float(arr)
    ok = math.isfinite(v) and (v > minimum if strict else v >= minimum)
    ok = ok and (maximum is None or v <= maximum)
  if not ok:
    bound = f'{">" if strict else ">="} {minimum}'
    if maximum is not None:
      bound += f' and <= {maximum}'
    raise ValueError(f'{attack}: {name} must be a finite real scalar {bound}, got {value!r}')


def _check_int(attack: str, name: str, value: Any, minimum: int = 1) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
      value < minimum):
    raise ValueError(f'{attack}: {name} must be an integer >= {minimum} (a static Python '
                     f'value), got {value!r}')


def _check_norm(attack: str, norm: Any, supported: tuple[str, ...] = NORMS) -> None:
  if norm not in NORMS:
    raise ValueError(f"{attack}: norm must be one of {NORMS}, got {norm!r}")
  if norm not in supported:
    raise ValueError(f'{attack}: norm {norm!r} is not supported; {attack} supports norm in '
                     f'{supported}')


def _check_eot(attack: str, eot_samples: Any, eot_average: Any) -> None:
  _check_int(attack, 'eot_samples', eot_samples)
  if eot_average not in EOT_AVERAGES:
    raise ValueError(f'{attack}: eot_average must be one of {EOT_AVERAGES}, '
                     f'got {eot_average!r}')


def _resolve_loss(attack: str, loss: Any) -> LossFn:
  if callable(loss):
    return loss
  try:
    return get_loss(loss)
  except ValueError as e:
    raise ValueError(f'{attack}: {e}') from None


# ----------------------------------------------------------------------------------------
# Geometry: norms, directions, exact projections, random starts.
# ----------------------------------------------------------------------------------------


def _bcast(v: Array, like: Array) -> Array:
  """Reshapes a per-example [B] array to [B, 1, ..., 1] (rank promotion is strict)."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _flat_l2(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1))


def _eps_floor(eps: Array, dtype) -> Array:
  """The largest float below float(eps) in `dtype` (0 stays 0).

  Clipping to this value instead of float32(eps) keeps the realised perturbation <= eps
  even when it is compared with the (possibly smaller) float64 value of eps.
  """
  eps = jnp.asarray(eps, dtype)
  return jnp.nextafter(eps, jnp.zeros_like(eps))


def _project_linf(x_adv: Array, x: Array, eps: Array) -> Array:
  e = _eps_floor(eps, x.dtype)
  x_adv = jnp.clip(x_adv, jnp.maximum(x - e, 0.0), jnp.minimum(x + e, 1.0))
  # fl(x + e) can round outwards, so the float32 difference may exceed e by half an ulp;
  # one ulp back towards x fixes it (a second pass covers binade edges). x is in the box,
  # so moving towards it never leaves the box.
  for _ in range(2):
    x_adv = jnp.where(jnp.abs(x_adv - x) > e, jnp.nextafter(x_adv, x), x_adv)
  return x_adv


def _project_l2(x_adv: Array, x: Array, eps: Array) -> Array:
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
    norm = _flat_l2(delta)
    scale = jnp.where(norm > bound, target / jnp.maximum(norm, _TINY), 1.0)
    x_adv = jnp.clip(x + delta * _bcast(scale, x), 0.0, 1.0)
  return x_adv


def _project(x_adv: Array, x: Array, eps: Array, norm: str) -> Array:
  return _project_linf(x_adv, x, eps) if norm == 'linf' else _project_l2(x_adv, x, eps)


def _ascent_direction(grad: Array, norm: str) -> Array:
  """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
  if norm == 'linf':
    return jnp.sign(grad)
  return grad / _bcast(jnp.maximum(_flat_l2(grad), _TINY), grad)


def _random_init(key: Array, x: Array, eps: Array, norm: str) -> Array:
  """A uniform random point of the eps ball around x, projected into the box."""
  if norm == 'linf':
    noise = jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    return _project_linf(x + eps * noise, x, eps)
  dir_key, radius_key = jax.random.split(key)
  direction = jax.random.normal(dir_key, x.shape, x.dtype)
  direction = direction / _bcast(jnp.maximum(_flat_l2(direction), _TINY), x)
  dim = math.prod(x.shape[1:])
  # Radius u^(1/d) makes the point uniform in the ball (not just on the sphere).
  radius = eps * jax.random.uniform(radius_key, x.shape[:1], x.dtype) ** (1.0 / dim)
  return _project_l2(x + direction * _bcast(radius, x), x, eps)


def _misclassified(logits: Array, y: Array) -> Array:
  return jnp.argmax(logits, axis=-1) != y


def _better(loss_a: Array, mis_a: Array, loss_b: Array, mis_b: Array) -> Array:
  """Whether a is more adversarial than b: misclassified first, then the larger loss."""
  return (mis_a & ~mis_b) | ((mis_a == mis_b) & (loss_a > loss_b))


# ----------------------------------------------------------------------------------------
# EOT and model wrappers.
# ----------------------------------------------------------------------------------------


def eot_logits_fn(logits_fn: LogitsFn, num_samples: int, *,
                  average: str = 'logits') -> LogitsFn:
  """Expectation over Transformation as a model wrapper.

  The returned `logits_fn(x, key)` draws `num_samples` realisations of the model's
  randomness from `jax.random.split(key, num_samples)` (vectorised with `vmap`, not a Python
  loop) and averages them, so its gradient is the EOT gradient of that average:

  * 'logits': mean of the logits over draws.
  * 'probs':  log of the mean softmax (a valid logit vector for the ensemble's
    probabilities; the usual loss for SAP / RSE-style n-pass ensembles).

  The third variant, the mean of the per-draw LOSSES (AutoAttack's EOT, and the attacks'
  default), cannot be written as a logits function; use an attack's `eot_samples` /
  `eot_average='loss'` hyperparameters for it.

  Args:
    logits_fn: `(x float32[B, H, W, C], key) -> float32[B, K]`.
    num_samples: number of draws k >= 1; with k = 1 `logits_fn` is returned unchanged.
    average: 'logits' or 'probs'.

  Returns:
    A logits function with the same signature.
  """
  _check_int('eot_logits_fn', 'num_samples', num_samples)
  if average not in ('logits', 'probs'):
    raise ValueError(f"eot_logits_fn: average must be 'logits' or 'probs' (for the mean of "
                     f"per-draw losses use an attack's eot_samples), got {average!r}")
  if num_samples == 1:
    return logits_fn

  def averaged(x: Array, key: Array) -> Array:
    draws = jax.vmap(lambda k: logits_fn(x, k))(jax.random.split(key, num_samples))
    if average == 'logits':
      return jnp.mean(draws, axis=0)
    log_probs = jax.nn.log_softmax(draws, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - math.log(num_samples)

  return averaged


def fixed_randomness(logits_fn: LogitsFn, key: Array) -> LogitsFn:
  """Freezes a stochastic model's randomness: every call uses `key`, whatever it is given.

  The literature's check (Carlini et al. 2019): an attack on the frozen model should reach
  about the undefended model's accuracy; then re-enable randomness.

  Args:
    logits_fn: `(x, key) -> logits`.
    key: the key used for every call.

  Returns:
    A deterministic `logits_fn(x, key)` that ignores its key.
  """
  return lambda x, unused_key: logits_fn(x, key)


def transfer_attack(attack_fn: AttackFn, source_logits_fn: LogitsFn) -> AttackFn:
  """Makes a transfer attack: craft on `source_logits_fn`, evaluate on any target.

  Args:
    attack_fn: any attack with the standard signature (bind its static hparams first).
    source_logits_fn: the surrogate / source model, e.g. the undefended base model.

  Returns:
    `attack(logits_fn, key, x, y, **hparams) -> x_adv` that ignores `logits_fn` (the target)
    and runs `attack_fn` on the source model.
  """

  def attack(logits_fn: LogitsFn, key: Array, x: Array, y: Array, **hparams) -> Array:
    del logits_fn  # The target model is only used by the evaluator.
    return attack_fn(source_logits_fn, key, x, y, **hparams)

  return attack


def _make_objective(logits_fn: LogitsFn, loss_fn: LossFn, eot_samples: int,
                    eot_average: str) -> Callable[[Array, Array, Array], tuple[Array, Array]]:
  """Returns `objective(x, y, key) -> (loss float32[B], logits float32[B, K])`.

  With EOT the loss is the chosen average and the returned logits are the draws' mean
  logits ('loss', 'logits') or the log of their mean softmax ('probs'); attacks use those
  logits for their success tests, so success is judged on the ensemble, not a lucky draw.
  """
  if eot_samples > 1 and eot_average != 'loss':
    logits_fn = eot_logits_fn(logits_fn, eot_samples, average=eot_average)
    eot_samples = 1
  if eot_samples == 1:

    def objective(x, y, key):
      logits = logits_fn(x, key)
      return loss_fn(logits, y), logits

    return objective

  def eot_objective(x, y, key):
    draws = jax.vmap(lambda k: logits_fn(x, k))(jax.random.split(key, eot_samples))
    losses = jax.vmap(lambda z: loss_fn(z, y))(draws)
    return jnp.mean(losses, axis=0), jnp.mean(draws, axis=0)

  return eot_objective


def _value_and_grad(objective):
  """`(x, y, key) -> (loss[B], logits[B, K], grad[B, ...])` of the summed per-example loss."""

  def fn(x, y, key):

    def total(x_):
      loss, logits = objective(x_, y, key)
      return jnp.sum(loss), (loss, logits)

    (_, (loss, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return loss, logits, grad

  return fn


def _with_restarts(run_one: Callable, key: Array, restarts: int):
  """Runs `run_one(restart_key)` for every restart in parallel with vmap.

  Restart r uses `fold_in(key, r)`, so restart 0 is the same whatever `restarts` is.

  Returns:
    The outputs of `run_one`, each with a leading [restarts] axis.
  """
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(restarts))
  return jax.vmap(run_one)(keys)


# ----------------------------------------------------------------------------------------
# FGSM and PGD.
# ----------------------------------------------------------------------------------------


def _pgd_impl(logits_fn, key, x, y, eps, step_size, *, steps, norm, loss, random_start,
              restarts, track_best, eot_samples, eot_average, unroll=False):
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  loss_fn = _resolve_loss('pgd', loss)
  grad_fn = _value_and_grad(_make_objective(logits_fn, loss_fn, eot_samples, eot_average))
  need_scores = restarts > 1 or track_best

  def run_one(restart_key):
    init_key, loop_key = jax.random.split(restart_key)
    x0 = _random_init(init_key, x, eps, norm) if random_start else x
    no_loss = jnp.full(x.shape[:1], -jnp.inf, x.dtype)
    no_mis = jnp.zeros(x.shape[:1], jnp.bool_)

    def body(i, carry):
      x_adv, best_x, best_loss, best_mis = carry
      loss_val, logits, grad = grad_fn(x_adv, y, jax.random.fold_in(loop_key, i))
      if track_best:
        mis = _misclassified(logits, y)
        upd = _better(loss_val, mis, best_loss, best_mis)
        best_x = jnp.where(_bcast(upd, x), x_adv, best_x)
        best_loss = jnp.where(upd, loss_val, best_loss)
        best_mis = best_mis | mis
      x_adv = _project(x_adv + step_size * _ascent_direction(grad, norm), x, eps, norm)
      return x_adv, best_x, best_loss, best_mis

    x_adv, best_x, best_loss, best_mis = lax.fori_loop(
        0, steps, body, (x0, x0, no_loss, no_mis), unroll=True if unroll else None)
    if not need_scores:
      return x_adv, no_loss, no_mis
    # The last iterate has not been scored yet: one more forward pass.
    final_loss, final_logits = _make_objective(logits_fn, loss_fn, eot_samples, eot_average)(
        x_adv, y, jax.random.fold_in(loop_key, steps))
    final_mis = _misclassified(final_logits, y)
    if not track_best:
      return x_adv, final_loss, final_mis
    upd = _better(final_loss, final_mis, best_loss, best_mis)
    return (jnp.where(_bcast(upd, x), x_adv, best_x), jnp.where(upd, final_loss, best_loss),
            best_mis | final_mis)

  xs, losses, mis = _with_restarts(run_one, key, restarts)
  x_adv, best_loss, best_mis = xs[0], losses[0], mis[0]
  for r in range(1, restarts):  # Static and small: an elementwise selection per restart.
    upd = _better(losses[r], mis[r], best_loss, best_mis)
    x_adv = jnp.where(_bcast(upd, x), xs[r], x_adv)
    best_loss = jnp.where(upd, losses[r], best_loss)
    best_mis = best_mis | mis[r]
  return lax.stop_gradient(x_adv)


def pgd(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
        step_size: Optional[float] = None, steps: int = 10, norm: str = 'linf',
        loss: str | LossFn = 'cross_entropy', random_start: bool = True, restarts: int = 1,
        track_best: bool = False, eot_samples: int = 1, eot_average: str = 'loss',
        unroll: bool = False) -> Array:
  """Projected gradient ascent (Madry et al. 2018) in the L-inf or L2 ball.

  Each step moves `step_size` along sign(grad) (L-inf) or grad/||grad||_2 (L2), then projects
  onto the eps ball and the [0, 1] box. Restarts run in parallel (vmap over restart keys
  `fold_in(key, r)`); per example the result of the most adversarial restart is kept:
  misclassified beats correct, then the larger loss wins.

  Args:
    logits_fn: `(x, key) -> float32[B, K]`.
    key: typed PRNG key; restart r uses `fold_in(key, r)`.
    x: float32[B, H, W, C] in [0, 1].
    y: int32[B] true labels.
    eps: ball radius in [0, 1] pixel units (traced).
    step_size: per-step size in pixel units (traced); default 2.5 * eps / steps.
    steps: number of gradient steps (static).
    norm: 'linf' or 'l2' (static).
    loss: a `LOSSES` name or a per-example loss callable (static).
    random_start: start from a uniform random point of the ball, else from x.
    restarts: number of restarts >= 1, vectorised (static).
    track_best: return each example's most adversarial iterate (same rule as restarts)
      instead of the last one; costs one extra forward pass.
    eot_samples: draws of the model's randomness per gradient (static; vmap over
      `jax.random.split(step_key, eot_samples)`).
    eot_average: 'loss' (mean of per-draw losses, default), 'logits' or 'probs'.
    unroll: unroll the step loop in the graph (static). On XLA:CPU the gradient
      convolutions inside a rolled loop get a slow layout: unrolled, PGD-20 on LeNet-5 runs
      ~3x faster, at the price of a compile time that grows with `steps`. Same iterates.

  Returns:
    x_adv float32[B, H, W, C] with ||x_adv - x|| <= eps and 0 <= x_adv <= 1 exactly.
  """
  _check_real('pgd', 'eps', eps)
  _check_real('pgd', 'step_size', step_size)
  _check_int('pgd', 'steps', steps)
  _check_int('pgd', 'restarts', restarts)
  _check_norm('pgd', norm)
  _check_eot('pgd', eot_samples, eot_average)
  _resolve_loss('pgd', loss)
  if step_size is None:
    step_size = 2.5 * jnp.asarray(eps, jnp.float32) / steps
  return _pgd_impl(logits_fn, key, x, y, eps, step_size, steps=steps, norm=norm, loss=loss,
                   random_start=random_start, restarts=restarts, track_best=track_best,
                   eot_samples=eot_samples, eot_average=eot_average, unroll=unroll)


def fgsm(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
         step_size: Optional[float] = None, norm: str = 'linf',
         loss: str | LossFn = 'cross_entropy', random_start: bool = False,
         eot_samples: int = 1, eot_average: str = 'loss') -> Array:
  """Fast gradient sign method (Goodfellow et al. 2015), the SAP paper's attack.

  `x_adv = clip(x + eps * sign(grad))` for L-inf; for L2 the fast gradient method
  `x + eps * grad / ||grad||_2`. With `random_start` it is "FGSM-RS" (Wong et al. 2020): a
  uniform start in the ball and a step of 1.25 * eps, then projection.

  Args:
    logits_fn, key, x, y: as for `pgd`.
    eps: budget in pixel units (traced). The SAP grid {0, 1, 2, 4, 8, 16, 32, 64}/255 is a
      config matter.
    step_size: default eps (1.25 * eps with random_start), traced.
    norm: 'linf' or 'l2'.
    loss: a `LOSSES` name or callable.
    random_start: start from a uniform random point of the ball.
    eot_samples, eot_average: EOT over the model's randomness (see `pgd`). SAP's own
      evaluation used the 100-sample Monte-Carlo gradient, i.e. eot_samples=100.

  Returns:
    x_adv float32[B, H, W, C] inside the eps ball and the box.
  """
  _check_real('fgsm', 'eps', eps)
  _check_real('fgsm', 'step_size', step_size)
  _check_norm('fgsm', norm)
  _check_eot('fgsm', eot_samples, eot_average)
  _resolve_loss('fgsm', loss)
  if step_size is None:
    step_size = (1.25 if random_start else 1.0) * jnp.asarray(eps, jnp.float32)
  return _pgd_impl(logits_fn, key, x, y, eps, step_size, steps=1, norm=norm, loss=loss,
                   random_start=random_start, restarts=1, track_best=False,
                   eot_samples=eot_samples, eot_average=eot_average)


# ----------------------------------------------------------------------------------------
# APGD (Croce & Hein 2020).
# ----------------------------------------------------------------------------------------


def _apgd_checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Step-size checkpoints w_j = p_j * steps for p_0 = 0, p_1 = 0.22 and
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as integer interval lengths.

  Returns:
    (is_checkpoint bool[steps], interval int32[steps]): iteration i (producing x^(i+1)) ends
    an interval of length interval[i] iff is_checkpoint[i].
  """
  length = max(int(0.22 * steps), 1)
  decrement = max(int(0.03 * steps), 1)
  min_length = max(int(0.06 * steps), 1)
  is_checkpoint = np.zeros(steps, bool)
  interval = np.zeros(steps, np.int32)
  position = 0
  while position + length <= steps:
    position += length
    is_checkpoint[position - 1] = True
    interval[position - 1] = length
    length = max(length - decrement, min_length)
  return is_checkpoint, interval


def _apgd_run(grad_fn, key, x, y, eps, step0, rho, alpha, *, steps, norm, random_start):
  """One APGD run. Returns (x_best_adv, margin_best): per example, the iterate with the
  largest margin (misclassified if any iterate was) and that margin."""
  init_key, loop_key = jax.random.split(key)
  x0 = _random_init(init_key, x, eps, norm) if random_start else x
  loss0, logits0, grad0 = grad_fn(x0, y, jax.random.fold_in(loop_key, 0))
  margin0 = margin(logits0, y)
  is_checkpoint, interval = _apgd_checkpoints(steps)
  is_checkpoint, interval = jnp.asarray(is_checkpoint), jnp.asarray(interval, x.dtype)
  batch = x.shape[:1]
  init = dict(
      x_cur=x0, x_prev=x0, grad=grad0, loss_cur=loss0,
      x_best=x0, grad_best=grad0, loss_best=loss0,
      x_adv=x0, margin_best=margin0,
      eta=jnp.full(batch, step0, x.dtype),
      increases=jnp.zeros(batch, x.dtype),
      loss_best_at_checkpoint=loss0,
      reduced_at_checkpoint=jnp.zeros(batch, jnp.bool_))

  def body(i, s):
    bx = lambda v: _bcast(v, x)
    # The first step is a plain gradient step (no momentum term yet).
    a = jnp.where(i == 0, 1.0, alpha).astype(x.dtype)
    z = _project(s['x_cur'] + bx(s['eta']) * _ascent_direction(s['grad'], norm), x, eps, norm)
    x_new = _project(s['x_cur'] + a * (z - s['x_cur']) + (1.0 - a) * (s['x_cur'] - s['x_prev']),
                     x, eps, norm)
    loss_new, logits_new, grad_new = grad_fn(x_new, y, jax.random.fold_in(loop_key, i + 1))
    margin_new = margin(logits_new, y)

    s = dict(s)
    adv = margin_new > s['margin_best']
    s['x_adv'] = jnp.where(bx(adv), x_new, s['x_adv'])
    s['margin_best'] = jnp.maximum(margin_new, s['margin_best'])
    s['increases'] = s['increases'] + (loss_new > s['loss_cur']).astype(x.dtype)
    improved = loss_new > s['loss_best']
    s['x_best'] = jnp.where(bx(improved), x_new, s['x_best'])
    s['grad_best'] = jnp.where(bx(improved), grad_new, s['grad_best'])
    s['loss_best'] = jnp.where(improved, loss_new, s['loss_best'])
    s['x_prev'], s['x_cur'], s['grad'], s['loss_cur'] = s['x_cur'], x_new, grad_new, loss_new

    # Checkpoint: halve the step where the loss rose in fewer than rho of the interval's
    # steps (condition 1), or where the step was not halved at the previous checkpoint and
    # the best loss has not improved since (condition 2); restart those from the best point.
    at_checkpoint = is_checkpoint[i]
    condition1 = s['increases'] < rho * interval[i]
    condition2 = ~s['reduced_at_checkpoint'] & (s['loss_best'] <= s['loss_best_at_checkpoint'])
    halve = at_checkpoint & (condition1 | condition2)
    s['eta'] = jnp.where(halve, 0.5 * s['eta'], s['eta'])
    s['x_cur'] = jnp.where(bx(halve), s['x_best'], s['x_cur'])
    # Momentum restarts from zero at the best point (AutoAttack keeps the stale x_prev).
    s['x_prev'] = jnp.where(bx(halve), s['x_best'], s['x_prev'])
    s['grad'] = jnp.where(bx(halve), s['grad_best'], s['grad'])
    s['loss_cur'] = jnp.where(halve, s['loss_best'], s['loss_cur'])
    s['reduced_at_checkpoint'] = jnp.where(at_checkpoint, halve, s['reduced_at_checkpoint'])
    s['loss_best_at_checkpoint'] = jnp.where(at_checkpoint, s['loss_best'],
                                             s['loss_best_at_checkpoint'])
    s['increases'] = jnp.where(at_checkpoint, 0.0, s['increases'])
    return s

  final = lax.fori_loop(0, steps, body, init)
  return final['x_adv'], final['margin_best']


def _apgd_impl(logits_fn, key, x, y, eps, step_size, rho, momentum, *, steps, norm, loss,
               restarts, eot_samples, eot_average, random_start, target=None):
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  eps = jnp.asarray(eps, x.dtype)
  step0 = 2.0 * eps if step_size is None else jnp.asarray(step_size, x.dtype)
  if target is None:
    loss_fn = _resolve_loss('apgd', loss)
  else:
    loss_fn = lambda logits, labels: dlr_targeted(logits, labels, target)
  grad_fn = _value_and_grad(_make_objective(logits_fn, loss_fn, eot_samples, eot_average))
  run_one = functools.partial(_apgd_run, grad_fn, x=x, y=y, eps=eps, step0=step0, rho=rho,
                              alpha=momentum, steps=steps, norm=norm,
                              random_start=random_start)
  xs, margins = _with_restarts(run_one, key, restarts)
  best = jnp.argmax(margins, axis=0)  # [B]: per example, the restart with the largest margin.
  x_adv = jnp.take_along_axis(xs, best.reshape((1,) + best.shape + (1,) * (x.ndim - 1)),
                              axis=0)[0]
  return lax.stop_gradient(x_adv), jnp.max(margins, axis=0)


def _check_apgd(name, eps, step_size, steps, restarts, norm, rho, momentum, eot_samples,
                eot_average):
  _check_real(name, 'eps', eps)
  _check_real(name, 'step_size', step_size)
  _check_real(name, 'rho', rho, maximum=1.0)
  _check_real(name, 'momentum', momentum, maximum=1.0)
  _check_int(name, 'steps', steps)
  _check_int(name, 'restarts', restarts)
  _check_norm(name, norm)
  _check_eot(name, eot_samples, eot_average)


def apgd(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
         norm: str = 'linf', loss: str | LossFn = 'cross_entropy', steps: int = 100,
         restarts: int = 1, step_size: Optional[float] = None, rho: float = 0.75,
         momentum: float = 0.75, random_start: bool = True, eot_samples: int = 1,
         eot_average: str = 'loss') -> Array:
  """Auto-PGD (Croce & Hein 2020), untargeted, L-inf or L2.

  Gradient steps with momentum `x^{k+1} = P(x^k + a (z^{k+1} - x^k) + (1 - a)(x^k - x^{k-1}))`,
  `z^{k+1} = P(x^k + eta^k dir(grad))`, initial eta = 2 eps (both norms, as in the authors'
  code). At checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
  (fractions of `steps`) the step size of an example is halved, and the example restarts
  from its best point, if its loss increased in fewer than rho of the interval's steps or
  if its step was not halved last time and its best loss has not improved since. Each
  example returns the iterate with the largest margin over all iterates and restarts, i.e.
  a misclassified one if there ever was one.

  Args:
    logits_fn, key, x, y: as for `pgd`.
    eps: budget (traced).
    norm: 'linf' or 'l2'.
    loss: 'cross_entropy'/'ce', 'dlr', 'margin' or a callable (drives the steps; the
      returned point is chosen by margin).
    steps: iterations (100 in AutoAttack).
    restarts: vectorised restarts (restart r uses `fold_in(key, r)`).
    step_size: initial step (traced); default 2 * eps.
    rho: the oscillation threshold of condition 1 (traced).
    momentum: alpha (traced).
    random_start: start from a random point of the ball, else from x.
    eot_samples, eot_average: EOT (AutoAttack-rand: 20 draws, 'loss'). The margin used
      to pick the returned point is that of the draws' mean logits.

  Returns:
    x_adv float32[B, H, W, C] inside the eps ball and the box.
  """
  _check_apgd('apgd', eps, step_size, steps, restarts, norm, rho, momentum, eot_samples,
              eot_average)
  _resolve_loss('apgd', loss)
  x_adv, _ = _apgd_impl(logits_fn, key, x, y, eps, step_size, rho, momentum, steps=steps,
                        norm=norm, loss=loss, restarts=restarts, eot_samples=eot_samples,
                        eot_average=eot_average, random_start=random_start)
  return x_adv


def _apgd_targeted_impl(logits_fn, key, x, y, eps, step_size, rho, momentum, *, steps, norm,
                        restarts, num_target_classes, eot_samples, eot_average):
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  clean_key, attack_key = jax.random.split(key)
  clean_logits = _make_objective(logits_fn, margin, eot_samples, eot_average)(
      x, y, clean_key)[1]
  num_classes = clean_logits.shape[-1]
  num_targets = min(num_target_classes, num_classes - 1)
  # Targets: the classes other than y ordered by clean logit, the highest first.
  others = jnp.where(jax.nn.one_hot(y, num_classes, dtype=jnp.bool_), -jnp.inf, clean_logits)
  ranked = jnp.argsort(-others, axis=-1)[:, :num_targets]

  def body(t, carry):
    x_best, margin_best = carry
    target = ranked[:, t]
    x_t, margin_t = _apgd_impl(
        logits_fn, jax.random.fold_in(attack_key, t), x, y, eps, step_size, rho, momentum,
        steps=steps, norm=norm, loss=None, restarts=restarts, eot_samples=eot_samples,
        eot_average=eot_average, random_start=True, target=target)
    upd = margin_t > margin_best
    return jnp.where(_bcast(upd, x), x_t, x_best), jnp.maximum(margin_t, margin_best)

  init = (x, jnp.full(x.shape[:1], -jnp.inf, x.dtype))
  x_adv, margin_best = lax.fori_loop(0, num_targets, body, init)
  return lax.stop_gradient(x_adv), margin_best


def apgd_targeted(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
                  norm: str = 'linf', steps: int = 100, restarts: int = 1,
                  num_target_classes: int = 9, step_size: Optional[float] = None,
                  rho: float = 0.75, momentum: float = 0.75, eot_samples: int = 1,
                  eot_average: str = 'loss') -> Array:
  """APGD-T: APGD on the targeted DLR loss, once per target class (AutoAttack standard).

  The targets of an example are the `num_target_classes` classes other than y with the
  highest clean logits (capped at K - 1); the runs are a `lax.fori_loop` over the target
  rank, and per example the iterate with the largest (untargeted) margin is returned, so
  the result is untargeted-adversarial if any targeted run succeeded. Needs K >= 4.

  Args:
    logits_fn, key, x, y: as for `pgd`.
    eps, norm, steps, restarts, step_size, rho, momentum, eot_samples, eot_average: as for
      `apgd`.
    num_target_classes: number of target classes (9 in AutoAttack).

  Returns:
    x_adv float32[B, H, W, C] inside the eps ball and the box.
  """
  _check_apgd('apgd_targeted', eps, step_size, steps, restarts, norm, rho, momentum,
              eot_samples, eot_average)
  _check_int('apgd_targeted', 'num_target_classes', num_target_classes)
  x_adv, _ = _apgd_targeted_impl(
      logits_fn, key, x, y, eps, step_size, rho, momentum, steps=steps, norm=norm,
      restarts=restarts, num_target_classes=num_target_classes, eot_samples=eot_samples,
      eot_average=eot_average)
  return x_adv


# ----------------------------------------------------------------------------------------
# Square Attack (Andriushchenko et al. 2020).
# ----------------------------------------------------------------------------------------


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
  r, c = _bcast(rows, like), _bcast(cols, like)
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
    return p / jnp.maximum(jnp.sqrt(jnp.sum(p * p)), _TINY)

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


def _square_impl(logits_fn, key, x, y, eps, p_init, *, norm, queries, eot_samples, done=None):
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  eps = jnp.asarray(eps, x.dtype)
  batch, height, width, channels = x.shape
  size = min(height, width)
  objective = _make_objective(logits_fn, margin, eot_samples, 'loss')
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
    x_init = _project_linf(x + eps * stripes, x, eps)
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
    delta = delta * _bcast(eps / jnp.maximum(_flat_l2(delta), _TINY), x)
    x_init = _project_l2(x + delta, x, eps)
  init_margin = score(x_init, k_eval)
  x_best = jnp.where(_bcast(done0, x), x, x_init)
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
      x_new = _project_linf(x + jnp.where(window, eps * signs, delta), x, eps)
      # A square that changes nothing wastes a query: flip its signs (box permitting).
      unchanged = jnp.all(jnp.where(window, x_new == x_cur, True), axis=(1, 2, 3))
      x_flip = _project_linf(x + jnp.where(window, -eps * signs, delta), x, eps)
      x_new = jnp.where(_bcast(unchanged, x), x_flip, x_new)
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
      norm_image2 = _bcast(jnp.sum(jnp.square(delta.reshape(batch, -1)), axis=1), x)
      flips = jax.random.bernoulli(k_flip, 0.5, (batch,))
      bump = _place(_bump(side, size), rows1, cols1, flips, x)
      signs = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
      # New window content: a fresh bump plus the old content's direction, rescaled to use
      # the budget left in the image plus the mass freed in both windows.
      new = bump * signs + jnp.where(window1, delta, 0.0) / (norm_window1 + 1e-10)
      budget = jnp.sqrt(jnp.maximum(eps**2 - norm_image2, 0.0) / channels + norm_windows**2)
      new = new / jnp.maximum(channel_norm(new), _TINY) * budget
      delta_new = jnp.where(window1, new, jnp.where(window2, 0.0, delta))
      delta_new = delta_new * _bcast(eps / jnp.maximum(_flat_l2(delta_new), _TINY), x)
      x_new = _project_l2(x + delta_new, x, eps)
    margin_new = score(x_new, k_eval)
    accept = (margin_new > margin_cur) & (margin_cur <= 0) & ~done0
    return (i + 1, jnp.where(_bcast(accept, x), x_new, x_cur),
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
  _check_real('square', 'eps', eps)
  _check_real('square', 'p_init', p_init, minimum=0.0, strict=True, maximum=1.0)
  _check_int('square', 'queries', queries)
  _check_int('square', 'eot_samples', eot_samples)
  _check_norm('square', norm)
  x_adv, _ = _square_impl(logits_fn, key, x, y, eps, p_init, norm=norm, queries=queries,
                          eot_samples=eot_samples)
  return x_adv


# ----------------------------------------------------------------------------------------
# AutoAttack-style suites.
# ----------------------------------------------------------------------------------------


def _ensemble_correct(logits_fn, key, x, y, num_samples):
  """bool[B]: the argmax of the mean softmax over `num_samples` draws equals y."""
  if num_samples == 1:
    return jnp.argmax(logits_fn(x, key), axis=-1) == y
  log_probs = eot_logits_fn(logits_fn, num_samples, average='probs')(x, key)
  return jnp.argmax(log_probs, axis=-1) == y


def _keep_robust(robust, x_new, x_old, correct_new):
  """Updates only still-robust examples; returns (x, robust)."""
  x = jnp.where(_bcast(robust, x_new), x_new, x_old)
  return x, robust & correct_new


def autoattack_standard(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
                        norm: str = 'linf', steps: int = 100, queries: int = 5000,
                        targeted: bool = True, num_target_classes: int = 9,
                        restarts: int = 1) -> Array:
  """AutoAttack 'standard' for deterministic models: APGD-CE, APGD-T, Square.

  The attacks run in sequence; each one's result replaces an example only while that
  example is still robust (correctly classified), so the output is the per-example worst
  case. Shapes stay static (masks); an attack is skipped at run time (`lax.cond`) when no
  example is left, and Square starts with the broken examples marked done. FAB-T is not
  included.

  Args:
    logits_fn, key, x, y: as for `pgd`; the model should be deterministic (use
      `autoattack_rand` otherwise).
    eps: budget (traced).
    norm: 'linf' or 'l2'.
    steps: APGD iterations (100).
    queries: Square budget (5000).
    targeted: include APGD-T (targeted DLR, needs K >= 4).
    num_target_classes: APGD-T targets (9).
    restarts: APGD-CE restarts (1).

  Returns:
    x_adv float32[B, H, W, C] inside the eps ball and the box.
  """
  _check_real('autoattack_standard', 'eps', eps)
  _check_norm('autoattack_standard', norm)
  _check_int('autoattack_standard', 'steps', steps)
  _check_int('autoattack_standard', 'queries', queries)
  _check_int('autoattack_standard', 'num_target_classes', num_target_classes)
  _check_int('autoattack_standard', 'restarts', restarts)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  k_clean, k_ce, k_t, k_sq, k_eval = jax.random.split(key, 5)
  eval_keys = jax.random.split(k_eval, 3)
  correct = lambda x_, k: jnp.argmax(logits_fn(x_, k), axis=-1) == y
  robust = correct(x, k_clean)
  x_adv = x

  x_ce, _ = _apgd_impl(logits_fn, k_ce, x, y, eps, None, 0.75, 0.75, steps=steps, norm=norm,
                       loss='cross_entropy', restarts=restarts, eot_samples=1,
                       eot_average='loss', random_start=True)
  x_adv, robust = _keep_robust(robust, x_ce, x_adv, correct(x_ce, eval_keys[0]))

  if targeted:

    def run_targeted(_):
      x_t, _ = _apgd_targeted_impl(
          logits_fn, k_t, x, y, eps, None, 0.75, 0.75, steps=steps, norm=norm, restarts=1,
          num_target_classes=num_target_classes, eot_samples=1, eot_average='loss')
      return x_t

    x_t = lax.cond(jnp.any(robust), run_targeted, lambda _: x_adv, None)
    x_adv, robust = _keep_robust(robust, x_t, x_adv, correct(x_t, eval_keys[1]))

  def run_square(_):
    x_s, _ = _square_impl(logits_fn, k_sq, x, y, eps, 0.8, norm=norm, queries=queries,
                          eot_samples=1, done=~robust)
    return x_s

  x_s = lax.cond(jnp.any(robust), run_square, lambda _: x_adv, None)
  x_adv, robust = _keep_robust(robust, x_s, x_adv, correct(x_s, eval_keys[2]))
  return lax.stop_gradient(x_adv)


def autoattack_rand(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
                    norm: str = 'linf', steps: int = 100, eot_samples: int = 20,
                    restarts: int = 1) -> Array:
  """AutoAttack 'rand' for stochastic models: APGD-CE then APGD-DLR, both with EOT.

  AutoAttack's preset: untargeted, 1 restart, 100 iterations, gradients averaged over 20
  draws. Unlike AutoAttack, which decides "still robust" from ONE stochastic forward pass
  (PRs #104/#105), here an example counts as robust when the argmax of the mean softmax over
  `eot_samples` fresh draws is y; the final robust accuracy should still be re-scored by the
  evaluator with many fresh draws.

  Args:
    logits_fn, key, x, y: as for `pgd`.
    eps: budget (traced).
    norm: 'linf' or 'l2'.
    steps: APGD iterations (100).
    eot_samples: EOT draws per gradient (20).
    restarts: APGD restarts (1).

  Returns:
    x_adv float32[B, H, W, C] inside the eps ball and the box.
  """
  _check_real('autoattack_rand', 'eps', eps)
  _check_norm('autoattack_rand', norm)
  _check_int('autoattack_rand', 'steps', steps)
  _check_int('autoattack_rand', 'eot_samples', eot_samples)
  _check_int('autoattack_rand', 'restarts', restarts)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  k_clean, k_ce, k_dlr, k_eval_ce, k_eval_dlr = jax.random.split(key, 5)
  robust = _ensemble_correct(logits_fn, k_clean, x, y, eot_samples)
  x_adv = x
  for loss_name, k_attack, k_eval in (('cross_entropy', k_ce, k_eval_ce),
                                      ('dlr', k_dlr, k_eval_dlr)):

    def run(_, loss_name=loss_name, k_attack=k_attack):
      x_new, _ = _apgd_impl(logits_fn, k_attack, x, y, eps, None, 0.75, 0.75, steps=steps,
                            norm=norm, loss=loss_name, restarts=restarts,
                            eot_samples=eot_samples, eot_average='loss', random_start=True)
      return x_new

    x_new = lax.cond(jnp.any(robust), run, lambda _: x_adv, None)
    x_adv, robust = _keep_robust(robust, x_new, x_adv,
                                 _ensemble_correct(logits_fn, k_eval, x_new, y, eot_samples))
  return lax.stop_gradient(x_adv)


# ----------------------------------------------------------------------------------------
# Minimum-perturbation attacks.
# ----------------------------------------------------------------------------------------


def cw_l2(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, steps: int = 1000,
          search_steps: int = 9, learning_rate: float = 0.01, initial_const: float = 1e-3,
          confidence: float = 0.0, eps: Optional[float] = None, norm: str = 'l2',
          eot_samples: int = 1, eot_average: str = 'loss',
          return_success: bool = False) -> Array | tuple[Array, Array]:
  """Carlini & Wagner L2 (2017), RSE's main attack: a minimum-perturbation attack.

  Optimises `w` (x' = (tanh(w) + 1) / 2, so x' is always in the box) with Adam on
  `||x' - x||_2^2 + c * max(z_y - max_{j!=y} z_j, -confidence)`, `steps` steps per value of
  c, and binary-searches c per example over `search_steps` rounds (x10 while no success has
  been found, then bisection). Every evaluated iterate whose margin exceeds `confidence` is a
  success; the smallest-norm success is returned, or x itself when there is none.

  Args:
    logits_fn, key, x, y: as for `pgd`.
    steps: Adam steps per binary-search round (static); C&W used up to 10 000 with early
      abort. On 8x8 digits 300 already reach the minimum; 100 leave a few % unsolved.
    search_steps: binary-search rounds (static).
    learning_rate: Adam learning rate (traced).
    initial_const: first c (traced); 1e-3 as in C&W.
    confidence: kappa >= 0 (traced).
    eps: optional L2 budget (traced) for fixed-budget evaluation; the result is projected
      onto the eps ball, and a success whose norm exceeds eps is no longer reported.
    norm: must be 'l2' (accepted for config uniformity).
    eot_samples, eot_average: EOT; the hinge term is averaged ('loss') and success is judged
      on the draws' mean logits.
    return_success: also return bool[B], True where a success was found (and kept).

  Returns:
    x_adv float32[B, H, W, C] in [0, 1]; with return_success, (x_adv, success).
  """
  _check_int('cw_l2', 'steps', steps)
  _check_int('cw_l2', 'search_steps', search_steps)
  _check_real('cw_l2', 'learning_rate', learning_rate, strict=True)
  _check_real('cw_l2', 'initial_const', initial_const, strict=True)
  _check_real('cw_l2', 'confidence', confidence)
  _check_real('cw_l2', 'eps', eps)
  _check_norm('cw_l2', norm, ('l2',))
  _check_eot('cw_l2', eot_samples, eot_average)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  confidence = jnp.asarray(confidence, x.dtype)
  batch = x.shape[:1]
  hinge = lambda logits, labels: jnp.maximum(-margin(logits, labels), -confidence)
  objective = _make_objective(logits_fn, hinge, eot_samples, eot_average)
  to_image = lambda w: 0.5 * (jnp.tanh(w) + 1.0)
  w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1.0, 1.0) * (1.0 - 1e-6))
  optimizer = optax.adam(learning_rate)

  def total_loss(w, const, step_key):
    x_new = to_image(w)
    dist2 = jnp.sum(jnp.square((x_new - x).reshape(x.shape[0], -1)), axis=1)
    hinge_val, logits = objective(x_new, y, step_key)
    return jnp.sum(dist2 + const * hinge_val), (x_new, dist2, logits)

  grad_fn = jax.grad(total_loss, has_aux=True)

  def search_round(s, carry):
    const, lower, upper, best_x, best_dist2 = carry
    round_key = jax.random.fold_in(key, s)

    def step(i, inner):
      w, opt_state, best_x, best_dist2, found = inner
      grad, (x_new, dist2, logits) = grad_fn(w, const, jax.random.fold_in(round_key, i))
      success = margin(logits, y) > confidence
      upd = success & (dist2 < best_dist2)
      best_x = jnp.where(_bcast(upd, x), x_new, best_x)
      best_dist2 = jnp.where(upd, dist2, best_dist2)
      updates, opt_state = optimizer.update(grad, opt_state, w)
      return optax.apply_updates(w, updates), opt_state, best_x, best_dist2, found | success

    inner = (w0, optimizer.init(w0), best_x, best_dist2, jnp.zeros(batch, jnp.bool_))
    _, _, best_x, best_dist2, found = lax.fori_loop(0, steps, step, inner)
    upper = jnp.where(found, jnp.minimum(upper, const), upper)
    lower = jnp.where(found, lower, jnp.maximum(lower, const))
    const = jnp.where(upper < 1e10, 0.5 * (lower + upper), 10.0 * const)
    return const, lower, upper, best_x, best_dist2

  init = (jnp.full(batch, initial_const, x.dtype), jnp.zeros(batch, x.dtype),
          jnp.full(batch, 1e10, x.dtype), x, jnp.full(batch, jnp.inf, x.dtype))
  _, _, _, x_adv, best_dist2 = lax.fori_loop(0, search_steps, search_round, init)
  success = jnp.isfinite(best_dist2)
  if eps is not None:
    x_proj = _project_l2(x_adv, x, eps)
    success = success & jnp.all((x_proj == x_adv).reshape(x.shape[0], -1), axis=1)
    x_adv = x_proj
  x_adv = lax.stop_gradient(x_adv)
  return (x_adv, success) if return_success else x_adv


def deepfool(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, norm: str = 'l2',
             steps: int = 50, overshoot: float = 0.02, num_classes_considered: int = 10,
             eot_samples: int = 1,
             return_success: bool = False) -> Array | tuple[Array, Array]:
  """DeepFool (Moosavi-Dezfooli et al. 2016), L2 and L-inf, minimum perturbation.

  Per step and example: linearise `f_k = z_k - z_y` for the candidate classes k, take the
  class with the smallest `|f_k| / ||grad f_k||_q` (q = 2 for L2, q = 1 for L-inf), and step
  `(that ratio + 1e-4)` along `grad f_k / ||grad f_k||_2` (L2) or `sign(grad f_k)` (L-inf).
  Steps accumulate in r and `x_adv = clip(x + (1 + overshoot) r, 0, 1)`. Examples that are
  misclassified stop moving; the `lax.while_loop` ends when none is left or after `steps`.

  Args:
    logits_fn, key, x, y: as for `pgd` (the model must process examples independently).
    norm: 'l2' or 'linf'.
    steps: maximum iterations (the JumpReLU paper: 40 MNIST, 7 CIFAR).
    overshoot: (traced) 0.02 as in DeepFool and JumpReLU.
    num_classes_considered: the true class plus the `num_classes_considered - 1` other
      classes with the highest clean logits are considered (capped at K). 10 = all classes
      of a 10-class problem, i.e. 9 competitors as in the JumpReLU code.
    eot_samples: >1 linearises the mean logits over that many draws per step (identical to
      averaging the per-draw linearisations, since f_k is linear in the logits).
    return_success: also return bool[B], whether x_adv is misclassified (checked with a
      fresh forward pass).

  Returns:
    x_adv float32[B, H, W, C] in [0, 1] (the last iterate); with return_success,
    (x_adv, success).
  """
  _check_norm('deepfool', norm)
  _check_int('deepfool', 'steps', steps)
  _check_real('deepfool', 'overshoot', overshoot)
  _check_int('deepfool', 'num_classes_considered', num_classes_considered, minimum=2)
  _check_int('deepfool', 'eot_samples', eot_samples)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  model = eot_logits_fn(logits_fn, eot_samples, average='logits')
  clean_key, loop_key, final_key = jax.random.split(key, 3)
  clean_logits = model(x, clean_key)
  num_classes = clean_logits.shape[-1]
  num_competitors = min(num_classes_considered, num_classes) - 1
  others = jnp.where(jax.nn.one_hot(y, num_classes, dtype=jnp.bool_), -jnp.inf, clean_logits)
  candidates = jnp.argsort(-others, axis=-1)[:, :num_competitors]  # [B, M]
  # Cotangents e_k - e_y: one vjp per candidate gives grad (z_k - z_y) for all examples.
  cotangents = (jax.nn.one_hot(candidates, num_classes, dtype=x.dtype) -
                jax.nn.one_hot(y, num_classes, dtype=x.dtype)[:, None, :])
  overshoot = jnp.asarray(overshoot, x.dtype)
  batch = x.shape[0]

  def cond(state):
    i, _, _, active = state
    return (i < steps) & jnp.any(active)

  def body(state):
    i, r_total, x_cur, active = state
    logits, vjp_fn = jax.vjp(lambda z: model(z, jax.random.fold_in(loop_key, i)), x_cur)
    active = active & (jnp.argmax(logits, axis=-1) == y)
    f = jnp.take_along_axis(logits, candidates, axis=-1) - _label_logit(logits, y)[:, None]
    w = jax.vmap(lambda c: vjp_fn(c)[0], in_axes=1, out_axes=1)(cotangents)  # [B, M, ...]
    w_flat = w.reshape(batch, num_competitors, -1)
    if norm == 'l2':
      dual = jnp.sqrt(jnp.sum(jnp.square(w_flat), axis=-1))
    else:
      dual = jnp.sum(jnp.abs(w_flat), axis=-1)
    ratio = jnp.abs(f) / (dual + 1e-8)
    best = jnp.argmin(ratio, axis=1)
    ratio_best = jnp.take_along_axis(ratio, best[:, None], axis=1)[:, 0]
    w_best = jnp.take_along_axis(w, best.reshape((batch, 1) + (1,) * (x.ndim - 1)), axis=1)
    w_best = w_best[:, 0]
    r_step = _bcast(ratio_best + 1e-4, x) * _ascent_direction(w_best, norm)
    r_total = r_total + jnp.where(_bcast(active, x), r_step, 0.0)
    x_cur = jnp.clip(x + (1.0 + overshoot) * r_total, 0.0, 1.0)
    return i + 1, r_total, x_cur, active

  init = (jnp.asarray(0), jnp.zeros_like(x), x, jnp.ones(batch, jnp.bool_))
  _, _, x_adv, _ = lax.while_loop(cond, body, init)
  x_adv = lax.stop_gradient(x_adv)
  if not return_success:
    return x_adv
  success = jnp.argmax(model(x_adv, final_key), axis=-1) != y
  return x_adv, success


def ifgsm_min(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, step_size: float = 0.01,
              steps: int = 40, norm: str = 'linf', loss: str | LossFn = 'cross_entropy',
              eot_samples: int = 1, eot_average: str = 'loss',
              return_success: bool = False) -> Array | tuple[Array, Array]:
  """The JumpReLU paper's minimum-perturbation iterative FGSM (`fgsm_adaptive_iter`).

  Repeats `x <- clip(x + step_size * sign(grad), 0, 1)` on the examples that are still
  correctly classified, with NO eps-ball projection (the perturbation grows with the number
  of steps), for at most `steps` iterations (40 MNIST, 7 CIFAR in the paper).

  Args:
    logits_fn, key, x, y: as for `pgd`.
    step_size: per-step L-inf size (traced), 0.01 in the paper.
    steps: maximum iterations (static).
    norm: must be 'linf'.
    loss: a `LOSSES` name or callable.
    eot_samples, eot_average: EOT (see `pgd`).
    return_success: also return bool[B], whether x_adv is misclassified (fresh forward pass).

  Returns:
    x_adv float32[B, H, W, C] in [0, 1]; with return_success, (x_adv, success).
  """
  _check_real('ifgsm_min', 'step_size', step_size)
  _check_int('ifgsm_min', 'steps', steps)
  _check_norm('ifgsm_min', norm, ('linf',))
  _check_eot('ifgsm_min', eot_samples, eot_average)
  loss_fn = _resolve_loss('ifgsm_min', loss)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  step_size = jnp.asarray(step_size, x.dtype)
  objective = _make_objective(logits_fn, loss_fn, eot_samples, eot_average)
  grad_fn = _value_and_grad(objective)
  loop_key, final_key = jax.random.split(key)

  def cond(state):
    i, _, active = state
    return (i < steps) & jnp.any(active)

  def body(state):
    i, x_cur, active = state
    _, logits, grad = grad_fn(x_cur, y, jax.random.fold_in(loop_key, i))
    active = active & ~_misclassified(logits, y)
    x_new = jnp.clip(x_cur + step_size * jnp.sign(grad), 0.0, 1.0)
    return i + 1, jnp.where(_bcast(active, x), x_new, x_cur), active

  init = (jnp.asarray(0), x, jnp.ones(x.shape[:1], jnp.bool_))
  _, x_adv, _ = lax.while_loop(cond, body, init)
  x_adv = lax.stop_gradient(x_adv)
  if not return_success:
    return x_adv
  success = _misclassified(objective(x_adv, y, final_key)[1], y)
  return x_adv, success


def perturbation_norms(x: Array, x_adv: Array, norm: str) -> Array:
  """Per-example perturbation size ||x_adv - x||.

  Args:
    x, x_adv: float32[B, H, W, C].
    norm: 'linf' (max |delta|) or 'l2'.

  Returns:
    float32[B] in pixel units.
  """
  _check_norm('perturbation_norms', norm)
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
  _check_norm('relative_perturbation_norms', norm)
  zero = jnp.zeros_like(jnp.asarray(x))
  return perturbation_norms(x, x_adv, norm) / perturbation_norms(zero, x, norm)


# ----------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------

ATTACKS: dict[str, AttackFn] = {
    'fgsm': fgsm,
    'pgd': pgd,
    'apgd': apgd,
    'apgd_targeted': apgd_targeted,
    'square': square,
    'autoattack_standard': autoattack_standard,
    'autoattack_rand': autoattack_rand,
    'cw_l2': cw_l2,
    'deepfool': deepfool,
    'ifgsm_min': ifgsm_min,
}

# The norms each attack supports (its `norm` argument).
ATTACK_NORMS: dict[str, tuple[str, ...]] = {
    'fgsm': NORMS,
    'pgd': NORMS,
    'apgd': NORMS,
    'apgd_targeted': NORMS,
    'square': NORMS,
    'autoattack_standard': NORMS,
    'autoattack_rand': NORMS,
    'cw_l2': ('l2',),
    'deepfool': NORMS,
    'ifgsm_min': ('linf',),
}


def get_attack(name: str) -> AttackFn:
  """Looks up an attack by name.

  Raises:
    ValueError: listing the valid names if `name` is unknown.
  """
  if name not in ATTACKS:
    raise ValueError(f'attack must be one of {sorted(ATTACKS)}, got {name!r}')
  return ATTACKS[name]
