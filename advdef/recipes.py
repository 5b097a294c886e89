"""Training recipes: what loss a train step minimises, and on which (adversarial) inputs.

`train.recipe` is a spec string (advdef.config_utils.parse_spec). Adversarial examples are
made inside the jitted train step on the eval-mode network (BatchNorm running statistics,
no dropout, test-time masks, no training-time defense), with the current parameters held
constant, as in the ANP-VS and TRADES code. Epsilons are in [0, 1] pixels.

  standard
      cross-entropy on clean data.
  pgd_at(eps, step_size=None, steps=10, clean_weight=0.0, adv_weight=1.0, random_start=True)
      PGD adversarial training (Madry et al. 2018): CE on L-inf PGD examples; with
      clean_weight=1, adv_weight=2 it is ANP-VS's AT baseline, (CE_clean + 2 CE_adv) / 3.
      step_size defaults to 2.5 * eps / steps.
  fgsm_mix(eps, fraction, source=current|previous_epoch)
      the first `fraction` of every batch replaced by FGSM examples. JumpReLU's robust
      models: fraction 0.3 (MNIST) / 0.6 (CIFAR), source=current. The SAP paper's "ADV"
      model: fraction 0.2 at eps = 2/255, crafted on the model of the previous epoch
      (source=previous_epoch: parameters snapshotted at the start of every epoch).
  trades(eps, step_size=None, steps=10, beta=6.0)
      TRADES (Zhang et al. 2019): CE(x) + beta KL(p(x) || p(x_adv)), x_adv maximising that
      KL from x + 0.001 N(0, 1).
  anp(beta, lam, eps, step_size=None, steps=20, adv_weight=2.0, mask_lr_scale=10.0,
      kl_examples=0, mask_sites=None, a_uc_init_conv=None, a_uc_init_dense=None)
      ANP-VS (Madaan et al. 2020) with Beta-Bernoulli masks (advdef.pruning). Masks
      minimise CE_adv + beta KL / N; weights minimise (CE_clean + adv_weight CE_adv) /
      (1 + adv_weight) + beta KL / N + lam V (+ train.weight_decay as the authors' 1e-4 L2),
      V the vulnerability of the latent features. Two Adam optimizers over the two parameter
      groups: weights on train.learning_rate's schedule, masks on mask_lr_scale times it.
      N = kl_examples, or the number of training examples when 0. lam=0 is ANP without VS.
      mask_sites: site names or globs (default: the authors' placement for lenet5_caffe
      and vgg16_anp); a_uc_init_*: initial a_uc of conv / dense masks.
  bp(beta, mask_lr_scale=10.0, kl_examples=0, mask_sites=None, ...)
      the BP baseline: the same masks with clean training, CE + beta KL / N for both groups.

pgd_at, trades and anp take eps_warmup=f (default 0): the training attack's eps and step
size grow linearly from 0 to their full values over the first f of the run's steps (a
curriculum; short ANP runs from a clean model need it, see configs/mnist_anp.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from advdef import attacks
from advdef import config_utils
from advdef import pruning
from advdef import validate

RECIPES = ('standard', 'pgd_at', 'fgsm_mix', 'trades', 'anp', 'bp')
FIELD = 'train.recipe'

_SIGNATURES = {
    'standard': {},
    'pgd_at': dict(eps=None, step_size=None, steps=10, clean_weight=0.0, adv_weight=1.0,
                   random_start=True, eps_warmup=0.0),
    'fgsm_mix': dict(eps=None, fraction=None, source='current'),
    'trades': dict(eps=None, step_size=None, steps=10, beta=6.0, eps_warmup=0.0),
    'anp': dict(beta=None, lam=None, eps=None, step_size=None, steps=20, adv_weight=2.0,
                mask_lr_scale=10.0, kl_examples=0, eps_warmup=0.0, mask_sites=None,
                a_uc_init_conv=None, a_uc_init_dense=None),
    'bp': dict(beta=None, mask_lr_scale=10.0, kl_examples=0, mask_sites=None,
               a_uc_init_conv=None, a_uc_init_dense=None),
}
_MASK_KEYS = ('mask_sites', 'a_uc_init_conv', 'a_uc_init_dense')


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A parsed, validated recipe. hparams holds every argument, defaults filled in."""
  name: str
  hparams: dict[str, Any]

  @property
  def uses_masks(self) -> bool:
    return self.name in ('anp', 'bp')

  @property
  def needs_snapshot(self) -> bool:
    return self.name == 'fgsm_mix' and self.hparams['source'] == 'previous_epoch'

  @property
  def adversarial(self) -> bool:
    return self.name in ('pgd_at', 'fgsm_mix', 'trades', 'anp')

  def placement(self, model_name: str) -> pruning.Placement | None:
    if not self.uses_masks:
      return None
    return pruning.placement_from(model_name, **{k: self.hparams[k] for k in _MASK_KEYS})


def mask_placement(config) -> pruning.Placement | None:
  """Where a config's recipe puts pruning masks on its model; None without masks."""
  return parse_recipe(config.train.recipe).placement(config.model.name)


def parse_recipe(spec: str, field: str = FIELD) -> Recipe:
  """Spec string -> Recipe, with every argument checked (messages name `field`)."""
  parsed = config_utils.parse_spec(spec, field=field)
  if len(parsed) != 1:
    raise ValueError(f'{field}={spec!r}: give exactly one recipe; valid: {", ".join(RECIPES)}')
  name, kwargs = parsed[0]
  if name not in _SIGNATURES:
    raise ValueError(f'{field}={spec!r}: unknown recipe {name!r}; valid: {", ".join(RECIPES)}')
  signature = _SIGNATURES[name]
  unknown = sorted(set(kwargs) - set(signature))
  if unknown:
    raise ValueError(f'{field}={spec!r}: {name} takes no argument {unknown[0]!r}; valid: '
                     f'{", ".join(signature) or "none"}')
  h = {**signature, **kwargs}
  missing = [k for k, v in h.items() if v is None and k not in ('step_size',) + _MASK_KEYS]
  if missing:
    raise ValueError(f'{field}={spec!r}: {name} needs {", ".join(missing)}')

  def positive(key, allow_zero=False, integer=False):
    validate.check_positive(f'{field}: {name}.{key}', h[key], allow_zero=allow_zero,
                            integer=integer)

  if 'eps' in h:
    positive('eps')
    if h['eps'] > 1:
      raise ValueError(f'{field}: {name}.eps={h["eps"]!r} must be in [0, 1] pixel units')
  if h.get('step_size') is not None:
    positive('step_size')
  if 'eps_warmup' in h:
    positive('eps_warmup', allow_zero=True)
    if h['eps_warmup'] >= 1:
      raise ValueError(f'{field}: {name}.eps_warmup={h["eps_warmup"]!r} is a fraction of the '
                       'training steps, in [0, 1)')
  if 'steps' in h:
    positive('steps', integer=True)
  if name == 'pgd_at':
    positive('clean_weight', allow_zero=True)
    positive('adv_weight', allow_zero=True)
    if h['clean_weight'] + h['adv_weight'] <= 0:
      raise ValueError(f'{field}: pgd_at needs clean_weight + adv_weight > 0')
    if not isinstance(h['random_start'], bool):
      raise ValueError(f'{field}: pgd_at.random_start={h["random_start"]!r} must be True/False')
  if name == 'fgsm_mix':
    positive('fraction')
    validate.check_probability(f'{field}: fgsm_mix.fraction', h['fraction'])
    validate.check_choice(f'{field}: fgsm_mix.source', h['source'],
                              ('current', 'previous_epoch'))
  if name in ('trades', 'anp', 'bp'):
    positive('beta', allow_zero=True)
  if name == 'anp':
    positive('lam', allow_zero=True)
    positive('adv_weight', allow_zero=True)
  if name in ('anp', 'bp'):
    positive('mask_lr_scale')
    positive('kl_examples', allow_zero=True, integer=True)
  return Recipe(name, h)


# ---------------------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------------------


def mask_labels(params):
  """'masks' for Beta-Bernoulli mask parameters, 'weights' for everything else."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {k: 'masks' if pruning.is_mask_param(k) else 'weights' for k in flat}
  return flax.traverse_util.unflatten_dict(labels)


def wrap_optimizer(recipe: Recipe, weights_tx: optax.GradientTransformation,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """ANP/BP: Adam on the masks at mask_lr_scale x the weights' schedule, no weight decay.

  Other recipes use `weights_tx` for every parameter.
  """
  if not recipe.uses_masks:
    return weights_tx
  scale = recipe.hparams['mask_lr_scale']
  masks_tx = optax.adam(lambda step: scale * schedule(step))
  return optax.multi_transform({'weights': weights_tx, 'masks': masks_tx}, mask_labels)


# ---------------------------------------------------------------------------------------
# Losses. Each returns (grads, new_batch_stats, metrics) for one batch.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a recipe needs from the train step.

  forward(params, batch_stats, x, key, capture) -> (logits, new_batch_stats, features):
    the training-mode network (dropout, sampled masks, training-time defense).
  eval_logits_fn(params, batch_stats) -> logits_fn(x, key): the eval-mode network.
  cross_entropy(logits, y) -> float32[B] (with the config's label smoothing).
  num_train: training-set size (ANP's N).
  unroll: unroll attack loops (on XLA:CPU 3-8% faster per step, 1.2-1.8x the compile time;
    see training.make_train_step).
  total_steps: length of the run in steps (for eps_warmup; 0: no warm-up possible).
  """
  forward: Callable
  eval_logits_fn: Callable
  cross_entropy: Callable
  num_train: int
  unroll: bool
  total_steps: int = 0


def _accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, -1) == y)


def _frozen_eval_fn(ctx, params, batch_stats):
  frozen = jax.lax.stop_gradient((params, batch_stats))
  return ctx.eval_logits_fn(*frozen)


def _pgd(ctx, h, logits_fn, key, x, y):
  return attacks.pgd(logits_fn, key, x, y, eps=h['eps'], step_size=h['step_size'],
                     steps=h['steps'], random_start=h.get('random_start', True),
                     unroll=ctx.unroll)


def _standard(ctx, h, params, batch_stats, snapshot, x, y, key):
  def loss_fn(p):
    logits, bs, _ = ctx.forward(p, batch_stats, x, key, False)
    return jnp.mean(ctx.cross_entropy(logits, y)), (logits, bs)
  (loss, (logits, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, bs, {'loss': loss, 'accuracy': _accuracy(logits, y)}


def _pgd_at(ctx, h, params, batch_stats, snapshot, x, y, key):
  attack_key, clean_key, adv_key = jax.random.split(key, 3)
  x_adv = _pgd(ctx, h, _frozen_eval_fn(ctx, params, batch_stats), attack_key, x, y)
  cw, aw = h['clean_weight'], h['adv_weight']

  def loss_fn(p):
    bs, metrics, total = batch_stats, {}, 0.0
    if cw:
      logits, bs, _ = ctx.forward(p, bs, x, clean_key, False)
      total = total + cw * jnp.mean(ctx.cross_entropy(logits, y))
      metrics['accuracy'] = _accuracy(logits, y)
    if aw:
      logits_adv, bs, _ = ctx.forward(p, bs, x_adv, adv_key, False)
      total = total + aw * jnp.mean(ctx.cross_entropy(logits_adv, y))
      metrics['adv_accuracy'] = _accuracy(logits_adv, y)
    return total / (cw + aw), (bs, metrics)

  (loss, (bs, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, bs, {'loss': loss, **metrics}


def _fgsm_mix(ctx, h, params, batch_stats, snapshot, x, y, key):
  attack_key, fwd_key = jax.random.split(key)
  n = int(round(h['fraction'] * x.shape[0]))
  source = snapshot if h['source'] == 'previous_epoch' else (params, batch_stats)
  if n:
    x_fgsm = attacks.fgsm(_frozen_eval_fn(ctx, *source), attack_key, x[:n], y[:n],
                          eps=h['eps'])
    x = jnp.concatenate([x_fgsm, x[n:]], axis=0)
  return _standard(ctx, {}, params, batch_stats, None, x, y, fwd_key)


def _kl_rows(p_log, q_log):
  """KL(p || q) per row from log-probabilities."""
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def _trades(ctx, h, params, batch_stats, snapshot, x, y, key):
  init_key, fwd_key = jax.random.split(key)
  eval_fn = _frozen_eval_fn(ctx, params, batch_stats)
  p_nat = jax.nn.log_softmax(eval_fn(x, None))
  eps = h['eps']
  step = h['step_size'] if h['step_size'] is not None else 2.5 * eps / h['steps']
  grad_kl = jax.grad(lambda xa: jnp.sum(_kl_rows(p_nat, jax.nn.log_softmax(eval_fn(xa, None)))))

  def body(_, xa):
    xa = xa + step * jnp.sign(grad_kl(xa))
    return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)

  x0 = jnp.clip(x + 0.001 * jax.random.normal(init_key, x.shape), 0.0, 1.0)
  x_adv = jax.lax.stop_gradient(jax.lax.fori_loop(0, h['steps'], body, x0,
                                                  unroll=True if ctx.unroll else None))
  k1, k2 = jax.random.split(fwd_key)

  def loss_fn(p):
    logits, bs, _ = ctx.forward(p, batch_stats, x, k1, False)
    logits_adv, bs, _ = ctx.forward(p, bs, x_adv, k2, False)
    natural = jnp.mean(ctx.cross_entropy(logits, y))
    robust = jnp.mean(_kl_rows(jax.nn.log_softmax(logits), jax.nn.log_softmax(logits_adv)))
    return natural + h['beta'] * robust, (bs, logits, logits_adv, robust)

  (loss, (bs, logits, logits_adv, robust)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  return grads, bs, {'loss': loss, 'accuracy': _accuracy(logits, y),
                     'adv_accuracy': _accuracy(logits_adv, y), 'kl_robust': robust}


def _select_by_group(params, weight_grads, mask_grads):
  """Weights' gradients from one loss, masks' from the other (ANP's two objectives)."""
  labels = mask_labels(params)
  return jax.tree_util.tree_map(lambda lab, gw, gm: gm if lab == 'masks' else gw,
                                labels, weight_grads, mask_grads)


def _anp(ctx, h, params, batch_stats, snapshot, x, y, key, adversarial=True):
  attack_key, clean_key, adv_key = jax.random.split(key, 3)
  beta, n = h['beta'], h['kl_examples'] or ctx.num_train
  if adversarial:
    x_adv = _pgd(ctx, h, _frozen_eval_fn(ctx, params, batch_stats), attack_key, x, y)

  def losses(p):
    kl = pruning.kl_total(p)
    logits, bs, feats = ctx.forward(p, batch_stats, x, clean_key, adversarial)
    ce_clean = jnp.mean(ctx.cross_entropy(logits, y))
    metrics = {'accuracy': _accuracy(logits, y), 'kl': kl}
    if not adversarial:
      loss = ce_clean + beta * kl / n
      return jnp.stack([loss, loss]), (bs, metrics)
    # Independent masks for the adversarial pass, as each call of the authors' net samples.
    logits_adv, bs, feats_adv = ctx.forward(p, bs, x_adv, adv_key, True)
    ce_adv = jnp.mean(ctx.cross_entropy(logits_adv, y))
    v = pruning.vulnerability(feats, feats_adv)
    aw = h['adv_weight']
    weights_loss = (ce_clean + aw * ce_adv) / (1 + aw) + beta * kl / n + h['lam'] * v
    masks_loss = ce_adv + beta * kl / n
    metrics.update(adv_accuracy=_accuracy(logits_adv, y), vulnerability=v)
    return jnp.stack([weights_loss, masks_loss]), (bs, metrics)

  both, vjp, (bs, metrics) = jax.vjp(losses, params, has_aux=True)
  if adversarial:
    (weight_grads,) = vjp(jnp.array([1.0, 0.0]))
    (mask_grads,) = vjp(jnp.array([0.0, 1.0]))
    grads = _select_by_group(params, weight_grads, mask_grads)
  else:
    (grads,) = vjp(jnp.array([1.0, 0.0]))
  return grads, bs, {'loss': both[0], 'mask_loss': both[1], **metrics}


_LOSSES = {
    'standard': _standard,
    'pgd_at': _pgd_at,
    'fgsm_mix': _fgsm_mix,
    'trades': _trades,
    'anp': _anp,
    'bp': lambda *args: _anp(*args, adversarial=False),
}


def attack_strength(h: dict[str, Any], step, total_steps: int):
  """(eps, step_size) of the training attack at `step` (traced): with eps_warmup = f > 0
  both grow linearly from 0 to their full values over the first f * total_steps steps."""
  eps = h['eps']
  step_size = h['step_size'] if h['step_size'] is not None else 2.5 * eps / h['steps']
  warmup = h.get('eps_warmup', 0.0)
  if not warmup:
    return eps, step_size
  if total_steps <= 0:
    raise ValueError(f'{FIELD}: eps_warmup needs the run length (StepContext.total_steps)')
  ramp = jnp.clip(jnp.asarray(step, jnp.float32) / (warmup * total_steps), 0.0, 1.0)
  return eps * ramp, step_size * ramp


def recipe_grads(recipe: Recipe, ctx: StepContext, params, batch_stats, snapshot, x, y, key,
                 step=0):
  """(grads, new_batch_stats, metrics) of one batch under `recipe` at train step `step`."""
  h = recipe.hparams
  metrics = {}
  if 'eps' in h and h.get('eps_warmup'):
    eps, step_size = attack_strength(h, step, ctx.total_steps)
    h = {**h, 'eps': eps, 'step_size': step_size}
    metrics['attack_eps'] = eps
  grads, bs, recipe_metrics = _LOSSES[recipe.name](ctx, h, params, batch_stats, snapshot, x,
                                                   y, key)
  return grads, bs, {**recipe_metrics, **metrics}
