"""Per-model figures of the ANP-VS tables: sparsity, FLOPs speed-up, memory, vulnerability.

  summary = model_summary.summarize(config, model, variables, images, labels, key, workdir)

- sparsity_percent: % of mask units pruned (E[pi] <= 1e-3), 0 for models without masks.
- flops_speedup, memory_percent: counted as the ANP code counts them (advdef.pruned_export),
  for the architectures with a layer plan (lenet5_caffe, vgg16_anp).
- vulnerability: mean |z(x) - z(x_adv)| over the activations (eval mode), with x_adv from
  `eval.vulnerability.attack` on the model itself (white-box) and on the model of
  `eval.vulnerability.source` (black-box transfer), with the accuracy on those x_adv.
- pruned_export: the physically pruned network (smaller conv and dense shapes), its largest
  deviation from the masked model and its measured speed-up over the dense masked model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import pruning
from advdef import recipes
from advdef import retrofit
from advdef import runs


def validate_vulnerability_config(e) -> None:
  v = e.vulnerability
  if not v.attack:
    return
  name, kwargs = _parse_attack(v.attack)
  config_utils.check_positive('eval.vulnerability.epsilon', v.epsilon)
  if v.epsilon > 1:
    raise ValueError(f'eval.vulnerability.epsilon={v.epsilon!r} must be in [0, 1] pixel units')
  from advdef import robustness  # lazily, as advdef.experiment imports it
  robustness.check_attack_call(f'eval.vulnerability.attack={v.attack!r}', name,
                               {**kwargs, 'eps': float(v.epsilon)})
  config_utils.check_positive('eval.vulnerability.num_examples', v.num_examples,
                              allow_zero=True, integer=True)
  if v.source and not os.path.exists(v.source):
    raise ValueError(f'eval.vulnerability.source={v.source!r} does not exist; give the workdir '
                     'of a trained run (the black-box source model) or leave it empty')


def _parse_attack(spec):
  parsed = config_utils.parse_spec(spec, field='eval.vulnerability.attack')
  if len(parsed) != 1 or parsed[0][0] not in attacks.ATTACKS:
    raise ValueError(f'eval.vulnerability.attack={spec!r}: name one attack; valid: '
                     f'{", ".join(attacks.ATTACKS)}')
  return parsed[0]


def _feature_fn(model, variables):
  """x -> (logits, [features]) of the eval-mode model (its masks kept)."""
  capture = model.clone(hook=retrofit.compose(
      model.hook, pruning.mask_hook(None, training=False, capture_features=True)))

  def fn(x):
    logits, state = capture.apply(variables, x, train=False, mutable=['intermediates'])
    return logits, pruning.latent_features(state['intermediates'])

  return jax.jit(fn)


def vulnerability_rows(config, model, variables, images, labels, key) -> dict[str, Any]:
  """White-box (and black-box, with a source) vulnerability and accuracy under the attack."""
  v = config.eval.vulnerability
  name, kwargs = _parse_attack(v.attack)
  n = v.num_examples or config.eval.num_attack_examples or len(images)
  images, labels = images[:n], labels[:n]
  features = _feature_fn(model, variables)
  sources = {'white_box': retrofit.make_logits_fn(model, variables)}
  if v.source:
    source_run = runs.load_run(v.source)
    if tuple(source_run.splits.info.image_shape) != tuple(images.shape[1:]):
      raise ValueError(f'eval.vulnerability.source={v.source!r} was trained on images of shape '
                       f'{source_run.splits.info.image_shape}, not {images.shape[1:]}')
    sources['black_box'] = retrofit.make_logits_fn(source_run.model, source_run.variables)
  out = {'attack': v.attack, 'epsilon': float(v.epsilon), 'n': int(len(images))}
  for label, logits_fn in sources.items():
    attack = jax.jit(lambda x, y, k, f=logits_fn: attacks.ATTACKS[name](
        f, k, x, y, eps=v.epsilon, **kwargs))
    total_v, correct, count = 0.0, 0, 0
    for i, batch in enumerate(data_lib.eval_batches(images, labels, config.eval.batch_size)):
      m = int(np.sum(batch['mask']))
      x, y = batch['image'][:m], batch['label'][:m]
      x_adv = attack(x, y, jax.random.fold_in(key, i))
      _, clean_feats = features(x)
      logits_adv, adv_feats = features(x_adv)
      total_v += float(pruning.vulnerability(clean_feats, adv_feats)) * m
      correct += int(jnp.sum(jnp.argmax(logits_adv, -1) == y))
      count += m
    out[f'{label}_vulnerability'] = total_v / count
    out[f'{label}_accuracy'] = correct / count
  if v.source:
    out['source'] = v.source
  return out


def summarize(config, model, variables, images, labels, key, workdir=None) -> dict[str, Any]:
  """The per-model summary (see the module docstring); writes pruned_model.npz to workdir."""
  from advdef import pruned_export
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
  if config.eval.vulnerability.attack:
    summary['vulnerability'] = vulnerability_rows(config, model, variables, images, labels,
                                                  key)
  if placement is not None and config.eval.export_pruned and name in pruned_export.PLANS:
    pruned = pruned_export.export_pruned(model, variables)
    x = jnp.asarray(data_lib.to_float(np.asarray(images[:config.eval.batch_size])))
    masked_logits = model.apply(variables, x, train=False)
    deviation = float(jnp.max(jnp.abs(jax.jit(pruned.apply)(x) - masked_logits)))
    speed = pruned_export.measure_speedup(model, variables, pruned,
                                          batch_size=config.eval.batch_size, input_shape=shape)
    summary['pruned_export'] = {'params': int(pruned.num_params),
                                'max_abs_logit_difference': deviation, **speed}
    if workdir and jax.process_index() == 0:
      path = os.path.join(workdir, 'pruned_model.npz')
      pruned_export.save_pruned(path, pruned)
      summary['pruned_export']['path'] = path
    logging.info('Pruned export: %s', summary['pruned_export'])
  return summary
