"""Minimum-perturbation attacks: C&W L2, DeepFool, the JumpReLU paper's iterative FGSM, TR.

They have no eps ball (C&W takes an optional one); report the sizes they reach with
`perturbation_norms` / `relative_perturbation_norms`.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
import optax

from advdef import validate
from advdef.attacks import adaptive
from advdef.attacks import geometry
from advdef.attacks import gradient
from advdef.attacks import losses

Array = losses.Array
LogitsFn = losses.LogitsFn
LossFn = losses.LossFn


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
  success; the smallest-norm success is returned, or x itself when there is none (and, at
  norm 0, when x is already misclassified).

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
  geometry.check_static_int('cw_l2.steps', steps)
  geometry.check_static_int('cw_l2.search_steps', search_steps)
  validate.check_hyperparameter('cw_l2.learning_rate', learning_rate, strict=True, scalar=True)
  validate.check_hyperparameter('cw_l2.initial_const', initial_const, strict=True, scalar=True)
  validate.check_hyperparameter('cw_l2.confidence', confidence, strict=False, scalar=True)
  geometry.check_optional('cw_l2.eps', eps, strict=False, scalar=True)
  geometry.check_norm('cw_l2', norm, ('l2',))
  geometry.check_eot('cw_l2', eot_samples, eot_average)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  confidence = jnp.asarray(confidence, x.dtype)
  batch = x.shape[:1]
  hinge = lambda logits, labels: jnp.maximum(-losses.margin(logits, labels), -confidence)
  objective = gradient.make_objective(logits_fn, hinge, eot_samples, eot_average)
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
      success = losses.margin(logits, y) > confidence
      upd = success & (dist2 < best_dist2)
      best_x = jnp.where(geometry.bcast(upd, x), x_new, best_x)
      best_dist2 = jnp.where(upd, dist2, best_dist2)
      updates, opt_state = optimizer.update(grad, opt_state, w)
      return optax.apply_updates(w, updates), opt_state, best_x, best_dist2, found | success

    inner = (w0, optimizer.init(w0), best_x, best_dist2, jnp.zeros(batch, jnp.bool_))
    _, _, best_x, best_dist2, found = lax.fori_loop(0, steps, step, inner)
    upper = jnp.where(found, jnp.minimum(upper, const), upper)
    lower = jnp.where(found, lower, jnp.maximum(lower, const))
    const = jnp.where(upper < 1e10, 0.5 * (lower + upper), 10.0 * const)
    return const, lower, upper, best_x, best_dist2

  # x itself is the smallest success where it is already misclassified: the tanh
  # parametrisation cannot return it exactly (to_image(w0) is ~1e-6 per pixel off), so it
  # is checked once up front, with the same objective (EOT included).
  _, logits0 = objective(x, y, jax.random.fold_in(key, search_steps))
  clean_success = losses.margin(logits0, y) > confidence
  init = (jnp.full(batch, initial_const, x.dtype), jnp.zeros(batch, x.dtype),
          jnp.full(batch, 1e10, x.dtype), x,
          jnp.where(clean_success, 0.0, jnp.inf).astype(x.dtype))
  _, _, _, x_adv, best_dist2 = lax.fori_loop(0, search_steps, search_round, init)
  success = jnp.isfinite(best_dist2)
  if eps is not None:
    x_proj = geometry.project_l2(x_adv, x, eps)
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
  geometry.check_norm('deepfool', norm)
  geometry.check_static_int('deepfool.steps', steps)
  validate.check_hyperparameter('deepfool.overshoot', overshoot, strict=False, scalar=True)
  geometry.check_static_int('deepfool.num_classes_considered', num_classes_considered,
                            minimum=2)
  geometry.check_static_int('deepfool.eot_samples', eot_samples)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  model = adaptive.eot_logits_fn(logits_fn, eot_samples, average='logits')
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
    f = (jnp.take_along_axis(logits, candidates, axis=-1) -
         losses.label_logit(logits, y)[:, None])
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
    r_step = geometry.bcast(ratio_best + 1e-4, x) * geometry.ascent_direction(w_best, norm)
    r_total = r_total + jnp.where(geometry.bcast(active, x), r_step, 0.0)
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
  validate.check_hyperparameter('ifgsm_min.step_size', step_size, strict=False, scalar=True)
  geometry.check_static_int('ifgsm_min.steps', steps)
  geometry.check_norm('ifgsm_min', norm, ('linf',))
  geometry.check_eot('ifgsm_min', eot_samples, eot_average)
  loss_fn = losses.resolve_loss('ifgsm_min', loss)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  step_size = jnp.asarray(step_size, x.dtype)
  objective = gradient.make_objective(logits_fn, loss_fn, eot_samples, eot_average)
  grad_fn = gradient.value_and_grad(objective)
  loop_key, final_key = jax.random.split(key)

  def cond(state):
    i, _, active = state
    return (i < steps) & jnp.any(active)

  def body(state):
    i, x_cur, active = state
    _, logits, grad = grad_fn(x_cur, y, jax.random.fold_in(loop_key, i))
    active = active & ~geometry.misclassified(logits, y)
    x_new = jnp.clip(x_cur + step_size * jnp.sign(grad), 0.0, 1.0)
    return i + 1, jnp.where(geometry.bcast(active, x), x_new, x_cur), active

  init = (jnp.asarray(0), x, jnp.ones(x.shape[:1], jnp.bool_))
  _, x_adv, _ = lax.while_loop(cond, body, init)
  x_adv = lax.stop_gradient(x_adv)
  if not return_success:
    return x_adv
  success = geometry.misclassified(objective(x_adv, y, final_key)[1], y)
  return x_adv, success


def trust_region(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, norm: str = 'l2',
                 steps: int = 40, radius: float = 0.01, overshoot: float = 0.02,
                 num_classes_considered: int = 10, eot_samples: int = 1,
                 return_success: bool = False) -> Array | tuple[Array, Array]:
  """The first-order trust-region attack TR, as the JumpReLU authors ran it.

  TR: Yao, Gholami, Xu, Keutzer, Mahoney, "Trust Region Based Adversarial Attack on Neural
  Networks", CVPR 2019 (arXiv 1812.06371). This follows the code the JumpReLU paper used,
  `attack_method.py` of github.com/erichson/JumpReLU (`select_index`, `tr_attack`,
  `tr_attack_iter`; called from `attack_WhiteBox.py` with eps_tr=0.01, c=9, p=2, 40
  iterations):

  1. Once, on the clean input: for the true class y and the candidate classes k, take the
     DeepFool ratio `(z_y - z_k) / ||grad (z_k - z_y)||_q` (q = 2 for L2, q = 1 for L-inf)
     and fix the target t as the class with the smallest one (the closest linearised
     boundary). t never changes afterwards.
  2. Per step, on the examples that are still correctly classified: linearise
     `f = z_t - z_y` at the current point, take the distance to its zero,
     `d = (z_y - z_t) / ||grad f||_q`, cap it at the trust radius, `d = min(d, radius)`,
     and step `x <- clip(x + (1 + overshoot) (d + 1e-4) u, 0, 1)` with
     `u = grad f / ||grad f||_2` (L2) or `sign(grad f)` (L-inf). The overshoot multiplies
     every step (capped ones too), and steps are taken from the current point, not summed
     from x as in `deepfool`.
  The `lax.while_loop` ends when every example is misclassified or after `steps` steps.
  Examples misclassified at the start never move (norm 0). The radius is FIXED: the
  authors' code has no adaptive radius (the TR paper's ratio-of-decrease update is not in
  it), so none is done here. Hence `||x_adv - x|| <= steps (1 + overshoot) (radius + 1e-4)`:
  with the authors' 0.01 (normalised units) and 40 steps that is ~0.41 normalised units
  (~0.13 in [0, 1] pixels for MNIST), below the typical minimal L2 distance of a natural
  MNIST model, so at those settings TR leaves many examples correct; raise `radius` or
  `steps` for a minimum-norm estimate.

  Differences from the authors' code (none matters for a deterministic model and
  correctly classified inputs, except the L-inf norm in 1.):
  * The clamp is to the [0, 1] box; the code clamps to the min/max of the (normalised)
    batch being attacked, which is the box for natural image batches.
  * The "true" logit in step 1 is y's; the code uses the top logit, which is y's for every
    example it attacks (misclassified ones are never attacked).
  * L-inf: the code's `select_index` with p=8 uses an L8 norm of the gradient difference
    while `tr_attack` uses the dual L1 norm; both use L1 here. (The JumpReLU paper only ran
    L2.)
  * An example stops for good once misclassified (as `deepfool` / `ifgsm_min` do); the code
    re-checks every step, which differs only for a stochastic model.
  * The additive 1e-4 is in [0, 1] pixel units (the code's is in normalised units), as in
    `deepfool`; gradient norms are guarded with `geometry.TINY`, the code adds 1e-6.

  Args:
    logits_fn, key, x, y: as for `pgd` (the model must process examples independently);
      x float32[B, H, W, C] in [0, 1], y int32[B].
    norm: 'l2' or 'linf'.
    steps: maximum number of steps (static); 40 in the JumpReLU code (MNIST and CIFAR).
    radius: trust radius (traced, > 0): the largest linearised step before the overshoot,
      in [0, 1] PIXEL units of the norm. The paper's 0.01 is in normalised units (inputs
      divided by the dataset std): for a single std sigma pass `0.01 * sigma` (MNIST:
      0.01 * 0.3081); with per-channel stds the normalised ball is an ellipsoid in pixel
      space, so the caller picks a representative sigma.
    overshoot: (traced, >= 0) each step is multiplied by 1 + overshoot; 0.02 in the code.
    num_classes_considered: the true class plus the `num_classes_considered - 1` other
      classes with the highest clean logits are candidate targets (capped at K). 10 = all
      classes of a 10-class problem, i.e. the code's c = 9.
    eot_samples: >1 uses the mean logits over that many draws (`eot_logits_fn`,
      'logits') for the target choice, the steps and the success check.
    return_success: also return bool[B], whether x_adv is misclassified (checked with a
      fresh forward pass).

  Returns:
    x_adv float32[B, H, W, C] in [0, 1] (the last iterate); with return_success,
    (x_adv, success).
  """
  geometry.check_norm('trust_region', norm)
  geometry.check_static_int('trust_region.steps', steps)
  validate.check_hyperparameter('trust_region.radius', radius, strict=True, scalar=True)
  validate.check_hyperparameter('trust_region.overshoot', overshoot, strict=False, scalar=True)
  geometry.check_static_int('trust_region.num_classes_considered', num_classes_considered,
                            minimum=2)
  geometry.check_static_int('trust_region.eot_samples', eot_samples)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  model = adaptive.eot_logits_fn(logits_fn, eot_samples, average='logits')
  select_key, loop_key, final_key = jax.random.split(key, 3)
  batch = x.shape[0]
  radius = jnp.asarray(radius, x.dtype)
  overshoot = jnp.asarray(overshoot, x.dtype)

  def dual_norm(g):  # g float32[..., n]
    if norm == 'l2':
      return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))
    return jnp.sum(jnp.abs(g), axis=-1)

  # 1. The target: the closest linearised boundary among the candidates, at the clean x.
  clean_logits, clean_vjp = jax.vjp(lambda z: model(z, select_key), x)
  num_classes = clean_logits.shape[-1]
  num_competitors = min(num_classes_considered, num_classes) - 1
  y_hot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
  others = jnp.where(y_hot > 0, -jnp.inf, clean_logits)
  candidates = jnp.argsort(-others, axis=-1)[:, :num_competitors]  # [B, M]
  cotangents = jax.nn.one_hot(candidates, num_classes, dtype=x.dtype) - y_hot[:, None, :]
  w = jax.vmap(lambda c: clean_vjp(c)[0], in_axes=1, out_axes=1)(cotangents)  # [B, M, ...]
  gap = (losses.label_logit(clean_logits, y)[:, None] -
         jnp.take_along_axis(clean_logits, candidates, axis=-1))
  # gap < 0 only where x is misclassified already (never attacked); the code clamps to 0.
  ratio = jnp.maximum(gap, 0.0) / jnp.maximum(dual_norm(w.reshape(batch, num_competitors, -1)),
                                               geometry.TINY)
  target = jnp.take_along_axis(candidates, jnp.argmin(ratio, axis=1)[:, None], axis=1)[:, 0]
  # Cotangent e_t - e_y: one vjp per step gives grad (z_t - z_y) for all examples.
  step_cotangent = jax.nn.one_hot(target, num_classes, dtype=x.dtype) - y_hot

  def cond(state):
    i, _, active = state
    return (i < steps) & jnp.any(active)

  # 2. Trust-region steps towards the target's linearised boundary.
  def body(state):
    i, x_cur, active = state
    logits, vjp_fn = jax.vjp(lambda z: model(z, jax.random.fold_in(loop_key, i)), x_cur)
    active = active & (jnp.argmax(logits, axis=-1) == y)
    g = vjp_fn(step_cotangent)[0]
    f = jnp.sum(logits * step_cotangent, axis=-1)  # z_t - z_y, <= 0 where active
    dist = -f / jnp.maximum(dual_norm(g.reshape(batch, -1)), geometry.TINY)
    size = (1.0 + overshoot) * (jnp.minimum(dist, radius) + 1e-4)
    x_new = jnp.clip(x_cur + geometry.bcast(size, x) * geometry.ascent_direction(g, norm),
                     0.0, 1.0)
    return i + 1, jnp.where(geometry.bcast(active, x), x_new, x_cur), active

  init = (jnp.asarray(0), x, jnp.ones(batch, jnp.bool_))
  _, x_adv, _ = lax.while_loop(cond, body, init)
  x_adv = lax.stop_gradient(x_adv)
  if not return_success:
    return x_adv
  success = jnp.argmax(model(x_adv, final_key), axis=-1) != y
  return x_adv, success
