"""Gradient attacks: FGSM, PGD, APGD (CE / DLR) and APGD-T, and their shared machinery.

The machinery (`make_objective`, `value_and_grad`, `with_restarts`) is also used by the
score-based, minimum-norm and suite attacks: EOT objectives whose logits are the draws'
ensemble, and vectorised restarts keyed by `fold_in(key, r)`.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from advdef import validate
from advdef.attacks import adaptive
from advdef.attacks import geometry
from advdef.attacks import losses

Array = losses.Array
LogitsFn = losses.LogitsFn
LossFn = losses.LossFn

# ----------------------------------------------------------------------------------------
# Objectives, gradients, restarts.
# ----------------------------------------------------------------------------------------


def make_objective(logits_fn: LogitsFn, loss_fn: LossFn, eot_samples: int,
                   eot_average: str) -> Callable[[Array, Array, Array], tuple[Array, Array]]:
  """Returns `objective(x, y, key) -> (loss float32[B], logits float32[B, K])`.

  With EOT the loss is the chosen average and the returned logits are the draws' mean
  logits ('loss', 'logits') or the log of their mean softmax ('probs'); attacks use those
  logits for their success tests, so success is judged on the ensemble, not a lucky draw.
  """
  if eot_samples > 1 and eot_average != 'loss':
    logits_fn = adaptive.eot_logits_fn(logits_fn, eot_samples, average=eot_average)
    eot_samples = 1
  if eot_samples == 1:

    def objective(x, y, key):
      logits = logits_fn(x, key)
      return loss_fn(logits, y), logits

    return objective

  def eot_objective(x, y, key):
    draws = jax.vmap(lambda k: logits_fn(x, k))(jax.random.split(key, eot_samples))
    per_draw = jax.vmap(lambda z: loss_fn(z, y))(draws)
    return jnp.mean(per_draw, axis=0), jnp.mean(draws, axis=0)

  return eot_objective


def value_and_grad(objective):
  """`(x, y, key) -> (loss[B], logits[B, K], grad[B, ...])` of the summed per-example loss."""

  def fn(x, y, key):

    def total(x_):
      loss, logits = objective(x_, y, key)
      return jnp.sum(loss), (loss, logits)

    (_, (loss, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return loss, logits, grad

  return fn


def with_restarts(run_one: Callable, key: Array, restarts: int):
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
  loss_fn = losses.resolve_loss('pgd', loss)
  grad_fn = value_and_grad(make_objective(logits_fn, loss_fn, eot_samples, eot_average))
  need_scores = restarts > 1 or track_best

  def run_one(restart_key):
    init_key, loop_key = jax.random.split(restart_key)
    x0 = geometry.random_init(init_key, x, eps, norm) if random_start else x
    no_loss = jnp.full(x.shape[:1], -jnp.inf, x.dtype)
    no_mis = jnp.zeros(x.shape[:1], jnp.bool_)

    def body(i, carry):
      x_adv, best_x, best_loss, best_mis = carry
      loss_val, logits, grad = grad_fn(x_adv, y, jax.random.fold_in(loop_key, i))
      if track_best:
        mis = geometry.misclassified(logits, y)
        upd = geometry.better(loss_val, mis, best_loss, best_mis)
        best_x = jnp.where(geometry.bcast(upd, x), x_adv, best_x)
        best_loss = jnp.where(upd, loss_val, best_loss)
        best_mis = best_mis | mis
      x_adv = geometry.project(x_adv + step_size * geometry.ascent_direction(grad, norm), x,
                               eps, norm)
      return x_adv, best_x, best_loss, best_mis

    x_adv, best_x, best_loss, best_mis = lax.fori_loop(
        0, steps, body, (x0, x0, no_loss, no_mis), unroll=True if unroll else None)
    if not need_scores:
      return x_adv, no_loss, no_mis
    # The last iterate has not been scored yet: one more forward pass.
    final_loss, final_logits = make_objective(logits_fn, loss_fn, eot_samples, eot_average)(
        x_adv, y, jax.random.fold_in(loop_key, steps))
    final_mis = geometry.misclassified(final_logits, y)
    if not track_best:
      return x_adv, final_loss, final_mis
    upd = geometry.better(final_loss, final_mis, best_loss, best_mis)
    return (jnp.where(geometry.bcast(upd, x), x_adv, best_x),
            jnp.where(upd, final_loss, best_loss), best_mis | final_mis)

  xs, restart_losses, mis = with_restarts(run_one, key, restarts)
  x_adv, best_loss, best_mis = xs[0], restart_losses[0], mis[0]
  for r in range(1, restarts):  # Static and small: an elementwise selection per restart.
    upd = geometry.better(restart_losses[r], mis[r], best_loss, best_mis)
    x_adv = jnp.where(geometry.bcast(upd, x), xs[r], x_adv)
    best_loss = jnp.where(upd, restart_losses[r], best_loss)
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
    unroll: unroll the step loop in the graph (static). Same iterates. With the models'
      canonical_conv a rolled loop runs at the speed of its step (see the package
      docstring, "Loop lowering"), so unrolling mostly adds compile time that grows with
      `steps`.

  Returns:
    x_adv float32[B, H, W, C] with ||x_adv - x|| <= eps and 0 <= x_adv <= 1 exactly.
  """
  validate.check_hyperparameter('pgd.eps', eps, strict=False, scalar=True)
  geometry.check_optional('pgd.step_size', step_size, strict=False, scalar=True)
  geometry.check_static_int('pgd.steps', steps)
  geometry.check_static_int('pgd.restarts', restarts)
  geometry.check_norm('pgd', norm)
  geometry.check_eot('pgd', eot_samples, eot_average)
  losses.resolve_loss('pgd', loss)
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
  validate.check_hyperparameter('fgsm.eps', eps, strict=False, scalar=True)
  geometry.check_optional('fgsm.step_size', step_size, strict=False, scalar=True)
  geometry.check_norm('fgsm', norm)
  geometry.check_eot('fgsm', eot_samples, eot_average)
  losses.resolve_loss('fgsm', loss)
  if step_size is None:
    step_size = (1.25 if random_start else 1.0) * jnp.asarray(eps, jnp.float32)
  return _pgd_impl(logits_fn, key, x, y, eps, step_size, steps=1, norm=norm, loss=loss,
                   random_start=random_start, restarts=1, track_best=False,
                   eot_samples=eot_samples, eot_average=eot_average)


# ----------------------------------------------------------------------------------------
# APGD (Croce & Hein 2020).
# ----------------------------------------------------------------------------------------


def _apgd_checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The step-size checkpoints of the reference implementation (AutoAttack's APGDAttack).

  The paper's checkpoints w_j = p_j * steps, p_0 = 0, p_1 = 0.22 and
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in the reference's integer form: the
  first interval is n_iter_2 = max(int(0.22 * steps), 1) steps long, each later one is
  size_decr = max(int(0.03 * steps), 1) shorter, but never shorter than
  n_iter_min = max(int(0.06 * steps), 1); a checkpoint is taken whenever an interval
  ends inside the run (the last one may be the last iteration), none after.

  Returns:
    (is_checkpoint bool[steps], interval int32[steps]): iteration i (producing x^(i+1)) ends
    an interval of length interval[i] iff is_checkpoint[i] (interval is 0 elsewhere).
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


def _apgd_halving(increases: Array, interval: Array, rho: Array, reduced_prev: Array,
                  loss_best: Array, loss_best_at_checkpoint: Array) -> Array:
  """Which examples halve their step at a checkpoint (the reference's two conditions).

  Condition 1 (oscillation): the loss rose in at most rho of the interval's steps,
  `increases <= rho * interval` (the reference's `check_oscillation` uses `<=`; the
  paper writes `<`). Condition 2 (stagnation): the step was not halved at the previous
  checkpoint and the best loss has not improved since, `~reduced_prev &
  (loss_best_at_checkpoint >= loss_best)` (ties count as no improvement).

  Args:
    increases: float32[B], how many of the interval's steps raised the loss.
    interval: the interval's length in steps (scalar).
    rho: the oscillation threshold in [0, 1] (scalar, traced).
    reduced_prev: bool[B], whether the step was halved at the previous checkpoint (set
      before the first one, so condition 2 cannot fire there).
    loss_best: float32[B], the best loss so far.
    loss_best_at_checkpoint: float32[B], the best loss at the previous checkpoint (at the
      start point before the first one).

  Returns:
    bool[B]: halve the step (and restart from the best point).
  """
  oscillating = increases <= rho * interval
  stagnating = ~reduced_prev & (loss_best_at_checkpoint >= loss_best)
  return oscillating | stagnating


def _apgd_run(grad_fn, key, x, y, eps, step0, rho, alpha, *, steps, norm, random_start):
  """One APGD run with the steps and step-size rules of the reference's `attack_single_run`.

  Returns (x_best_adv, margin_best): per example, the iterate with the largest margin
  (misclassified if any iterate was) and that margin.
  """
  init_key, loop_key = jax.random.split(key)
  x0 = geometry.random_init(init_key, x, eps, norm) if random_start else x
  loss0, logits0, grad0 = grad_fn(x0, y, jax.random.fold_in(loop_key, 0))
  margin0 = losses.margin(logits0, y)
  is_checkpoint, interval = _apgd_checkpoints(steps)
  is_checkpoint, interval = jnp.asarray(is_checkpoint), jnp.asarray(interval, x.dtype)
  batch = x.shape[:1]
  init = dict(
      x_cur=x0, x_prev=x0, grad=grad0,
      # What the next step's loss is compared with to count increases. The reference keeps
      # a zero-initialised history of the iterates' losses and its first comparison reads
      # index -1, a row not written yet: the first step counts as an increase iff its loss
      # is positive, not iff it beats the start point's. Zero here reproduces that.
      loss_cur=jnp.zeros(batch, x.dtype),
      x_best=x0, grad_best=grad0, loss_best=loss0,
      x_adv=x0, margin_best=margin0,
      eta=jnp.full(batch, step0, x.dtype),
      increases=jnp.zeros(batch, x.dtype),
      loss_best_at_checkpoint=loss0,
      # Set before the first checkpoint, as in the reference, so condition 2 (no halving
      # last time and no improvement since) cannot fire there.
      reduced_at_checkpoint=jnp.ones(batch, jnp.bool_))

  def body(i, s):
    bx = lambda v: geometry.bcast(v, x)
    # The first step is a plain gradient step (no momentum term yet).
    a = jnp.where(i == 0, 1.0, alpha).astype(x.dtype)
    z = geometry.project(s['x_cur'] + bx(s['eta']) * geometry.ascent_direction(s['grad'], norm),
                         x, eps, norm)
    x_new = geometry.project(
        s['x_cur'] + a * (z - s['x_cur']) + (1.0 - a) * (s['x_cur'] - s['x_prev']), x, eps, norm)
    loss_new, logits_new, grad_new = grad_fn(x_new, y, jax.random.fold_in(loop_key, i + 1))
    margin_new = losses.margin(logits_new, y)

    s = dict(s)
    adv = margin_new > s['margin_best']
    s['x_adv'] = jnp.where(bx(adv), x_new, s['x_adv'])
    s['margin_best'] = jnp.maximum(margin_new, s['margin_best'])
    # Increases are counted between consecutive iterates, whatever happened in between
    # (a restart at a checkpoint does not change what the next step is compared with).
    s['increases'] = s['increases'] + (loss_new > s['loss_cur']).astype(x.dtype)
    improved = loss_new > s['loss_best']
    s['x_best'] = jnp.where(bx(improved), x_new, s['x_best'])
    s['grad_best'] = jnp.where(bx(improved), grad_new, s['grad_best'])
    s['loss_best'] = jnp.where(improved, loss_new, s['loss_best'])
    s['x_prev'], s['x_cur'], s['grad'], s['loss_cur'] = s['x_cur'], x_new, grad_new, loss_new

    # Checkpoint: halve the step of the examples `_apgd_halving` picks and restart them
    # from their best point with its gradient. As in the reference, nothing else is reset:
    # the momentum term of the next step is x_best - x_prev (x_prev, the iterate before the
    # discarded one, is kept), and the next increase is counted against the discarded
    # iterate's loss (loss_cur), not the best loss.
    at_checkpoint = is_checkpoint[i]
    halve = at_checkpoint & _apgd_halving(s['increases'], interval[i], rho,
                                          s['reduced_at_checkpoint'], s['loss_best'],
                                          s['loss_best_at_checkpoint'])
    s['eta'] = jnp.where(halve, 0.5 * s['eta'], s['eta'])
    s['x_cur'] = jnp.where(bx(halve), s['x_best'], s['x_cur'])
    s['grad'] = jnp.where(bx(halve), s['grad_best'], s['grad'])
    s['reduced_at_checkpoint'] = jnp.where(at_checkpoint, halve, s['reduced_at_checkpoint'])
    s['loss_best_at_checkpoint'] = jnp.where(at_checkpoint, s['loss_best'],
                                             s['loss_best_at_checkpoint'])
    s['increases'] = jnp.where(at_checkpoint, 0.0, s['increases'])
    return s

  final = lax.fori_loop(0, steps, body, init)
  return final['x_adv'], final['margin_best']


def apgd_impl(logits_fn, key, x, y, eps, step_size, rho, momentum, *, steps, norm, loss,
              restarts, eot_samples, eot_average, random_start, target=None):
  """APGD without the checks: `apgd`'s arguments (a targeted DLR loss when `target` int32[B]
  is given); also run by the suites. Returns (x_adv, margin float32[B] of x_adv)."""
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  eps = jnp.asarray(eps, x.dtype)
  step0 = 2.0 * eps if step_size is None else jnp.asarray(step_size, x.dtype)
  if target is None:
    loss_fn = losses.resolve_loss('apgd', loss)
  else:
    loss_fn = lambda logits, labels: losses.dlr_targeted(logits, labels, target)
  grad_fn = value_and_grad(make_objective(logits_fn, loss_fn, eot_samples, eot_average))
  run_one = functools.partial(_apgd_run, grad_fn, x=x, y=y, eps=eps, step0=step0, rho=rho,
                              alpha=momentum, steps=steps, norm=norm,
                              random_start=random_start)
  xs, margins = with_restarts(run_one, key, restarts)
  best = jnp.argmax(margins, axis=0)  # [B]: per example, the restart with the largest margin.
  x_adv = jnp.take_along_axis(xs, best.reshape((1,) + best.shape + (1,) * (x.ndim - 1)),
                              axis=0)[0]
  return lax.stop_gradient(x_adv), jnp.max(margins, axis=0)


def _check_apgd(name, eps, step_size, steps, restarts, norm, rho, momentum, eot_samples,
                eot_average):
  validate.check_hyperparameter(f'{name}.eps', eps, strict=False, scalar=True)
  geometry.check_optional(f'{name}.step_size', step_size, strict=False, scalar=True)
  validate.check_hyperparameter(f'{name}.rho', rho, strict=False, maximum=1.0, scalar=True)
  validate.check_hyperparameter(f'{name}.momentum', momentum, strict=False, maximum=1.0,
                                scalar=True)
  geometry.check_static_int(f'{name}.steps', steps)
  geometry.check_static_int(f'{name}.restarts', restarts)
  geometry.check_norm(name, norm)
  geometry.check_eot(name, eot_samples, eot_average)


def apgd(logits_fn: LogitsFn, key: Array, x: Array, y: Array, *, eps: float,
         norm: str = 'linf', loss: str | LossFn = 'cross_entropy', steps: int = 100,
         restarts: int = 1, step_size: Optional[float] = None, rho: float = 0.75,
         momentum: float = 0.75, random_start: bool = True, eot_samples: int = 1,
         eot_average: str = 'loss') -> Array:
  """Auto-PGD (Croce & Hein 2020), untargeted, L-inf or L2.

  Follows the authors' reference implementation (AutoAttack, `autoattack/autopgd_base.py`,
  `APGDAttack.attack_single_run`) in its step and step-size rules, which differ from the
  paper's Algorithm 1 in the details noted below.

  Step: `x^{k+1} = P(x^k + a (z^{k+1} - x^k) + (1 - a)(x^k - x^{k-1}))`,
  `z^{k+1} = P(x^k + eta^k dir(grad))`, a = 1 for the first step and `momentum` after;
  initial eta = 2 eps (both norms). The best point (largest loss, strictly) and its
  gradient are tracked per example.

  Step-size rules, per example, at the checkpoints (`_apgd_checkpoints`):
    * Schedule: the paper's p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
      0.06) in the reference's integers: intervals of max(int(0.22 steps), 1) steps, then
      each max(int(0.03 steps), 1) shorter, down to max(int(0.06 steps), 1).
    * Increase count: the steps of the interval whose loss is larger than the previous
      iterate's. The very first step is compared with 0 (the reference reads an unwritten
      zero row of its loss history there), not with the start point's loss.
    * Condition 1: the loss rose in at most rho of the interval's steps
      (`count <= rho * interval`; the paper writes `<`).
    * Condition 2: the step was not halved at the previous checkpoint and the best loss
      has not improved since (`best_at_previous_checkpoint >= best`). The "halved at the
      previous checkpoint" flag starts set, so condition 2 cannot fire at the first one.
    * Halving: where either condition holds, eta is halved and the iterate and gradient
      restart from the best point. Nothing else is reset: the next step's momentum term is
      `x_best - x^{k}` (the iterate before the discarded one) and the next increase is
      counted against the discarded iterate's loss.

  Output (advdef's choice, not the reference's): each example returns the iterate with the
  largest margin over all iterates and restarts, i.e. a misclassified one if there ever was
  one.

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
  losses.resolve_loss('apgd', loss)
  x_adv, _ = apgd_impl(logits_fn, key, x, y, eps, step_size, rho, momentum, steps=steps,
                       norm=norm, loss=loss, restarts=restarts, eot_samples=eot_samples,
                       eot_average=eot_average, random_start=random_start)
  return x_adv


def apgd_targeted_impl(logits_fn, key, x, y, eps, step_size, rho, momentum, *, steps, norm,
                       restarts, num_target_classes, eot_samples, eot_average):
  """APGD-T without the checks (also run by the suites). Returns (x_adv, margin[B])."""
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  clean_key, attack_key = jax.random.split(key)
  clean_logits = make_objective(logits_fn, losses.margin, eot_samples, eot_average)(
      x, y, clean_key)[1]
  num_classes = clean_logits.shape[-1]
  num_targets = min(num_target_classes, num_classes - 1)
  # Targets: the classes other than y ordered by clean logit, the highest first.
  others = jnp.where(jax.nn.one_hot(y, num_classes, dtype=jnp.bool_), -jnp.inf, clean_logits)
  ranked = jnp.argsort(-others, axis=-1)[:, :num_targets]

  def body(t, carry):
    x_best, margin_best = carry
    target = ranked[:, t]
    x_t, margin_t = apgd_impl(
        logits_fn, jax.random.fold_in(attack_key, t), x, y, eps, step_size, rho, momentum,
        steps=steps, norm=norm, loss=None, restarts=restarts, eot_samples=eot_samples,
        eot_average=eot_average, random_start=True, target=target)
    upd = margin_t > margin_best
    return jnp.where(geometry.bcast(upd, x), x_t, x_best), jnp.maximum(margin_t, margin_best)

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
  geometry.check_static_int('apgd_targeted.num_target_classes', num_target_classes)
  x_adv, _ = apgd_targeted_impl(
      logits_fn, key, x, y, eps, step_size, rho, momentum, steps=steps, norm=norm,
      restarts=restarts, num_target_classes=num_target_classes, eot_samples=eot_samples,
      eot_average=eot_average)
  return x_adv

