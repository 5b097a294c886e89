"""Adaptive-attack tools: EOT over a stochastic model, fixed randomness, transfer attacks.

BPDA needs nothing here: a defense exposes its surrogate backward pass inside its
`logits_fn`, and every gradient attack differentiates whatever `logits_fn` it is given.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from advdef.attacks import geometry
from advdef.attacks import losses

Array = losses.Array
LogitsFn = losses.LogitsFn
AttackFn = losses.AttackFn


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
  geometry.check_static_int('eot_logits_fn.num_samples', num_samples)
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
