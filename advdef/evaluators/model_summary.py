"""Per-model figures of the ANP-VS tables: sparsity, FLOPs speed-up, memory, vulnerability.

  sections = model_summary.evaluate(ctx)   # {'model_summary': {...}}

- sparsity_percent: % of mask units pruned (E[pi] <= 1e-3), 0 for models without masks.
- flops_speedup, memory_percent: counted as the ANP code counts them (advdef.pruned_export),
  for the architectures with a layer plan (lenet5_caffe, vgg16_anp).
- vulnerability: mean |z(x) - z(x_adv)| over the activations (eval mode), with x_adv from
  `eval.vulnerability.attack` on the model itself (white-box) and on the model of
  `eval.vulnerability.source` (black-box transfer), with the accuracy on those x_adv;
  `white_box_per_feature`: per latent-feature site, in call order, {'site', 'vulnerability':
  [per unit (channel / neuron) mean over examples and positions of |z(x) - z(x_adv)|]}
  (the mean over a site's units is that site's term of the white-box vulnerability).
- pruned_export: the physically pruned network (smaller conv and dense shapes), its largest
  deviation from the masked model and its measured speed-up over the dense masked model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import parallel
from advdef import pruned_export
from advdef import pruning
from advdef import recipes
from advdef import retrofit
from advdef import runs
from advdef import validate
from advdef.evaluators import attack_suite
from advdef.evaluators import base
from advdef.evaluators import results


def parse_vulnerability_config(e) -> base.AttackSpec | None:
  """Checks eval.vulnerability before any compute; returns its attack, None when off."""
  v = e.vulnerability
  if not v.attack:
    return None
  parsed = config_utils.parse_spec(v.attack, field='eval.vulnerability.attack')
  if len(parsed) != 1 or parsed[0][0] not in attacks.ATTACKS:
    raise ValueError(f'eval.vulnerability.attack={v.attack!r}: name one attack; valid: '
                     f'{", ".join(attacks.ATTACKS)}')
  (name, kwargs), = parsed
  validate.check_positive('eval.vulnerability.epsilon', v.epsilon)
  if v.epsilon > 1:
    raise ValueError(f'eval.vulnerability.epsilon={v.epsilon!r} must be in [0, 1] pixel units')
  attack_suite.check_attack_call(f'eval.vulnerability.attack={v.attack!r}', name,
                                 {**kwargs, 'eps': float(v.epsilon)})
  validate.check_positive('eval.vulnerability.num_examples', v.num_examples,
                          allow_zero=True, integer=True)
  if v.source and not os.path.exists(v.source):
    raise ValueError(f'eval.vulnerability.source={v.source!r} does not exist; give the workdir '
                     'of a trained run (the black-box source model) or leave it empty')
  return base.AttackSpec(config_utils.spec_name(v.attack), name, kwargs)


def _feature_fn(model, variables, names: list[str] | None = None):
  """x -> (logits, [features]) of the eval-mode model (its masks kept). names: a list the
  first trace fills with the features' site names, in the order of the features."""
  capture = model.clone(hook=retrofit.compose(
      model.hook, pruning.mask_hook(None, training=False, capture_features=True)))

  def fn(x):
    logits, state = capture.apply(variables, x, train=False, mutable=['intermediates'])
    if names is not None and not names:
      names.extend(latent_feature_names(state['intermediates']))
    return logits, pruning.latent_features(state['intermediates'])

  return jax.jit(fn)


def latent_feature_names(intermediates) -> list[str]:
  """The site name of each of pruning.latent_features(intermediates), in the same order
  (call it inside the traced function too: jit's outputs sort dict keys)."""
  names = []
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
    if path[-1] == 'latent':
      names.extend(['/'.join(str(p) for p in path[:-1])] * len(value))
  return names


def per_unit_distortion_sums(features_clean, features_adv, mask) -> list[jax.Array]:
  """Per feature, float32[units]: the sum over the examples where `mask` is True of each
  unit's (last axis) mean over positions of |z(x) - z(x_adv)|; divided by the number of
  examples it is the per-unit vulnerability, whose mean over units is the feature's term of
  pruning.vulnerability."""
  out = []
  for a, b in zip(features_clean, features_adv):
    d = jnp.abs(a - b)
    d = jnp.mean(d, axis=tuple(range(1, d.ndim - 1))) if d.ndim > 2 else d  # [B, units]
    out.append(jnp.sum(jnp.where(mask[:, None], d, 0.0), axis=0))
  return out


def vulnerability_rows(ctx: base.Context, variables, bar=None) -> dict[str, Any]:
  """White-box (and black-box, with a source) vulnerability and accuracy under the attack.

  Batches are padded to one shape (one compilation) and split over the run's mesh; the
  padding rows are masked out of every sum. bar: an advdef.progress.Progress to show the
  batches on.
  """
  e = ctx.config.eval
  v, attack = e.vulnerability, ctx.plan.vulnerability
  n = v.num_examples or e.num_attack_examples or len(ctx.images)
  images, labels = ctx.images[:n], ctx.labels[:n]
  names: list[str] = []
  features = _feature_fn(ctx.model, variables, names)
  sources = {'white_box': retrofit.make_logits_fn(ctx.model, variables)}
  if v.source:
    source_run = runs.load_run(v.source)
    if tuple(source_run.splits.info.image_shape) != tuple(images.shape[1:]):
      raise ValueError(f'eval.vulnerability.source={v.source!r} was trained on images of shape '
                       f'{source_run.splits.info.image_shape}, not {images.shape[1:]}')
    sources['black_box'] = retrofit.make_logits_fn(
        source_run.model, parallel.replicate(source_run.variables, ctx.mesh))
  key = ctx.key('model_summary')
  out = {'attack': v.attack, 'epsilon': float(v.epsilon), 'n': int(len(images))}
  for label, logits_fn in sources.items():

    @jax.jit
    def batch_sums(x, y, mask, k, logits_fn=logits_fn):
      x_adv = attacks.ATTACKS[attack.name](logits_fn, k, x, y, eps=v.epsilon, **attack.kwargs)
      _, clean_feats = features(x)
      logits_adv, adv_feats = features(x_adv)
      per_example = pruning.vulnerability_per_example(clean_feats, adv_feats)
      correct = (jnp.argmax(logits_adv, -1) == y) & mask
      return (jnp.sum(jnp.where(mask, per_example, 0.0)), jnp.sum(correct),
              per_unit_distortion_sums(clean_feats, adv_feats, mask))

    total_v, correct, unit_sums = 0.0, 0, None
    num_batches = -(-len(images) // e.batch_size)
    for i, batch in enumerate(data_lib.eval_batches(images, labels, e.batch_size)):
      batch = parallel.shard_batch(batch, ctx.mesh)
      v_sum, c, units = batch_sums(batch['image'], batch['label'], batch['mask'],
                                   jax.random.fold_in(key, i))
      total_v += float(v_sum)
      correct += int(c)
      units = [np.asarray(u, np.float64) for u in units]
      unit_sums = units if unit_sums is None else [t + u for t, u in zip(unit_sums, units)]
      if bar is not None:
        bar.update(0, 1, f'{label} vulnerability', f'batch {i + 1}/{num_batches}')
    out[f'{label}_vulnerability'] = total_v / len(images)
    out[f'{label}_accuracy'] = correct / len(images)
    if label == 'white_box' and unit_sums is not None:
      out['white_box_per_feature'] = [
          {'site': site, 'vulnerability': [float(f'{v:.6g}') for v in u / len(images)]}
          for site, u in zip(names, unit_sums)]
  if v.source:
    out['source'] = v.source
  return out


def evaluate(ctx: base.Context) -> dict[str, Any]:
  """{'model_summary': the per-model summary}; see the module docstring. Writes
  pruned_model.npz to the workdir.

  The summary is stored as one entry (advdef.evaluators.results) and reused by a rerun,
  unless it has a black-box source (whose weights the entry's fingerprint does not cover)
  or its pruned export has gone from the workdir.
  """
  store = results.open_store(ctx)
  if ctx.config.eval.vulnerability.source:
    store = results.Store(None, None, active=False)
  entry_key = {'train_recipe': ctx.config.train.recipe}
  prng = {'model_summary': ctx.key('model_summary')}
  entry = store.get('model_summary', (), entry_key, prng, check=lambda entry: os.path.exists(
      entry.value['model_summary'].get('pruned_export', {}).get('path') or '.'))
  if entry is None:
    with base.progress('model_summary', unit='summaries') as bar:
      entry = store.put('model_summary', (), entry_key, prng, _summary(ctx, bar))
  else:
    base.log('model_summary: reused')
  return entry.value


def _summary(ctx: base.Context, bar) -> dict[str, Any]:
  config, model, images, variables = ctx.config, ctx.model, ctx.images, ctx.variables
  params = variables['params']
  summary: dict[str, Any] = {
      'params': int(sum(int(np.size(p)) for path, p in
                        jax.tree_util.tree_leaves_with_path(params)
                        if not pruning.is_mask_param(path))),
  }
  placement = recipes.mask_placement(config)
  active = None
  if placement is not None:
    sparsity = pruning.sparsity_summary(params)
    active = sparsity['active_units']
    summary.update(sparsity_percent=sparsity['sparsity_percent'], units=sparsity['units'],
                   active_units=active)
  else:
    summary['sparsity_percent'] = 0.0
  name = config.model.name
  shape = tuple(images.shape[1:])
  if name in pruned_export.PLANS:
    summary.update(pruned_export.count_flops_and_memory(name, active, shape,
                                                        model.num_classes))
  if ctx.plan.vulnerability is not None:
    summary['vulnerability'] = vulnerability_rows(ctx, parallel.replicate(variables, ctx.mesh),
                                                  bar)
  if placement is not None and config.eval.export_pruned and name in pruned_export.PLANS:
    pruned = pruned_export.export_pruned(model, variables)
    x = jnp.asarray(data_lib.to_float(np.asarray(images[:config.eval.batch_size])))
    masked_logits = model.apply(variables, x, train=False)
    deviation = float(jnp.max(jnp.abs(jax.jit(pruned.apply)(x) - masked_logits)))
    speed = pruned_export.measure_speedup(model, variables, pruned,
                                          batch_size=config.eval.batch_size, input_shape=shape)
    summary['pruned_export'] = {'params': int(pruned.num_params),
                                'max_abs_logit_difference': deviation, **speed}
    if ctx.workdir:
      path = os.path.join(ctx.workdir, 'pruned_model.npz')
      pruned_export.save_pruned(path, pruned)
      summary['pruned_export']['path'] = path
    logging.info('Pruned export: %s', summary['pruned_export'])
  return {'model_summary': summary}
