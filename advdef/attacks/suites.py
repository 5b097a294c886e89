"""AutoAttack-style suites: per-example worst case over a fixed sequence of attacks.

`autoattack_standard` (APGD-CE, APGD-T, Square) for deterministic models, `autoattack_rand`
(APGD-CE, APGD-DLR, both with EOT) for stochastic ones.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from advdef import validate
from advdef.attacks import adaptive
from advdef.attacks import geometry
from advdef.attacks import gradient
from advdef.attacks import losses
from advdef.attacks import score_based

Array = losses.Array
LogitsFn = losses.LogitsFn


def _ensemble_correct(logits_fn, key, x, y, num_samples):
  """bool[B]: the argmax of the mean softmax over `num_samples` draws equals y."""
  if num_samples == 1:
    return jnp.argmax(logits_fn(x, key), axis=-1) == y
  log_probs = adaptive.eot_logits_fn(logits_fn, num_samples, average='probs')(x, key)
  return jnp.argmax(log_probs, axis=-1) == y


def _keep_robust(robust, x_new, x_old, correct_new):
  """Updates only still-robust examples; returns (x, robust)."""
  x = jnp.where(geometry.bcast(robust, x_new), x_new, x_old)
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
  validate.check_hyperparameter('autoattack_standard.eps', eps, strict=False, scalar=True)
  geometry.check_norm('autoattack_standard', norm)
  geometry.check_static_int('autoattack_standard.steps', steps)
  geometry.check_static_int('autoattack_standard.queries', queries)
  geometry.check_static_int('autoattack_standard.num_target_classes', num_target_classes)
  geometry.check_static_int('autoattack_standard.restarts', restarts)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  k_clean, k_ce, k_t, k_sq, k_eval = jax.random.split(key, 5)
  eval_keys = jax.random.split(k_eval, 3)
  correct = lambda x_, k: jnp.argmax(logits_fn(x_, k), axis=-1) == y
  robust = correct(x, k_clean)
  x_adv = x

  x_ce, _ = gradient.apgd_impl(logits_fn, k_ce, x, y, eps, None, 0.75, 0.75, steps=steps,
                               norm=norm, loss='cross_entropy', restarts=restarts,
                               eot_samples=1, eot_average='loss', random_start=True)
  x_adv, robust = _keep_robust(robust, x_ce, x_adv, correct(x_ce, eval_keys[0]))

  if targeted:

    def run_targeted(_):
      x_t, _ = gradient.apgd_targeted_impl(
          logits_fn, k_t, x, y, eps, None, 0.75, 0.75, steps=steps, norm=norm, restarts=1,
          num_target_classes=num_target_classes, eot_samples=1, eot_average='loss')
      return x_t

    x_t = lax.cond(jnp.any(robust), run_targeted, lambda _: x_adv, None)
    x_adv, robust = _keep_robust(robust, x_t, x_adv, correct(x_t, eval_keys[1]))

  def run_square(_):
    x_s, _ = score_based.square_impl(logits_fn, k_sq, x, y, eps, 0.8, norm=norm,
                                     queries=queries, eot_samples=1, done=~robust)
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
  validate.check_hyperparameter('autoattack_rand.eps', eps, strict=False, scalar=True)
  geometry.check_norm('autoattack_rand', norm)
  geometry.check_static_int('autoattack_rand.steps', steps)
  geometry.check_static_int('autoattack_rand.eot_samples', eot_samples)
  geometry.check_static_int('autoattack_rand.restarts', restarts)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  k_clean, k_ce, k_dlr, k_eval_ce, k_eval_dlr = jax.random.split(key, 5)
  robust = _ensemble_correct(logits_fn, k_clean, x, y, eot_samples)
  x_adv = x
  for loss_name, k_attack, k_eval in (('cross_entropy', k_ce, k_eval_ce),
                                      ('dlr', k_dlr, k_eval_dlr)):

    def run(_, loss_name=loss_name, k_attack=k_attack):
      x_new, _ = gradient.apgd_impl(logits_fn, k_attack, x, y, eps, None, 0.75, 0.75,
                                    steps=steps, norm=norm, loss=loss_name, restarts=restarts,
                                    eot_samples=eot_samples, eot_average='loss',
                                    random_start=True)
      return x_new

    x_new = lax.cond(jnp.any(robust), run, lambda _: x_adv, None)
    x_adv, robust = _keep_robust(robust, x_new, x_adv,
                                 _ensemble_correct(logits_fn, k_eval, x_new, y, eot_samples))
  return lax.stop_gradient(x_adv)
