"""Per-example attack losses (larger = more adversarial), their registry, and shared types.

`loss(logits float32[B, K], y int32[B]) -> float32[B]`; attacks maximise it. The types
here (`Array`, `LogitsFn`, `LossFn`, `AttackFn`) are used by every module of the package:
this one sits at its bottom.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
LogitsFn = Callable[[Array, Array], Array]
LossFn = Callable[[Array, Array], Array]
AttackFn = Callable[..., Array]


def label_logit(logits: Array, y: Array) -> Array:
  """float32[B]: the logit of class y[b] of each example (logits float32[B, K])."""
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
  return jax.nn.logsumexp(logits, axis=-1) - label_logit(logits, y)


def margin(logits: Array, y: Array) -> Array:
  """Carlini-Wagner margin `max_{j != y} z_j - z_y`.

  Args:
    logits: float32[B, K], K >= 2.
    y: int32[B] true labels.

  Returns:
    float32[B] in logit units; > 0 exactly when the example is misclassified (ties count as
    correct). Larger = more adversarial.
  """
  return _max_other_logit(logits, y) - label_logit(logits, y)


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
  return (label_logit(logits, target) - label_logit(logits, y)) / scale


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


def resolve_loss(attack: str, loss: Any) -> LossFn:
  """An attack's `loss` hyperparameter as a function: a callable as is, else by name.

  Raises:
    ValueError: naming the attack, if `loss` is an unknown name.
  """
  if callable(loss):
    return loss
  try:
    return get_loss(loss)
  except ValueError as e:
    raise ValueError(f'{attack}: {e}') from None
