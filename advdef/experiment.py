"""One experiment end to end: validate the config, train (or resume, or load a trained
checkpoint), evaluate every defense and attack, write the report. Also `load_run` for
notebooks.

  python -m advdef.main --config=configs/quickstart.py --workdir=/tmp/qs
  run = advdef.load_run('/tmp/qs'); logits = run.logits_fn(x, key)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

import advdef
from advdef import checkpointing
from advdef import config_utils
from advdef import data as data_lib
from advdef import evaluation
from advdef import metric_writers
from advdef import models
from advdef import pruning
from advdef import recipes
from advdef import reporting
from advdef import retrofit
from advdef import runs
from advdef import training
from advdef.evaluators import defense_sweep
from advdef.evaluators import model_summary


def validate_config(config) -> None:
  """Fails fast, before any compute, with a message naming the field and the valid choices."""
  data_lib.validate_data_config(config.data)
  if config.model.name not in models.MODELS:
    raise ValueError(f'model.name={config.model.name!r} is not a registry model; valid names: '
                     f'{", ".join(sorted(models.MODELS))}')
  config_utils.check_choice('model.normalize', config.model.normalize, models.NORMALIZATIONS)
  t = config.train
  config_utils.check_positive('train.num_epochs', t.num_epochs, allow_zero=True, integer=True)
  config_utils.check_positive('train.batch_size', t.batch_size, integer=True)
  config_utils.check_choice('train.optimizer', t.optimizer, training.OPTIMIZERS)
  config_utils.check_choice('train.schedule', t.schedule, training.SCHEDULES)
  config_utils.check_positive('train.learning_rate', t.learning_rate)
  config_utils.check_positive('train.momentum', t.momentum, allow_zero=True)
  config_utils.check_positive('train.weight_decay', t.weight_decay, allow_zero=True)
  config_utils.check_positive('train.decay_factor', t.decay_factor)
  config_utils.check_positive('train.warmup_epochs', t.warmup_epochs, allow_zero=True)
  config_utils.check_probability('train.label_smoothing', t.label_smoothing)
  config_utils.check_positive('train.augment.crop_padding', t.augment.crop_padding,
                              allow_zero=True, integer=True)
  config_utils.check_positive('train.checkpoint_every_epochs', t.checkpoint_every_epochs,
                              allow_zero=True, integer=True)
  config_utils.check_positive('train.keep_checkpoints', t.keep_checkpoints, integer=True)
  config_utils.check_positive('train.log_every_steps', t.log_every_steps, integer=True)
  config_utils.check_positive('train.eval_every_epochs', t.eval_every_epochs, integer=True)
  for b in t.boundaries:
    config_utils.check_positive('train.boundaries', b)
  retrofit.make_transforms(config_utils.parse_spec(t.defense, field='train.defense'),
                           field='train.defense')
  recipe = recipes.parse_recipe(t.recipe)
  recipe.placement(config.model.name)  # ANP/BP on a model without a default placement
  if t.init_from and not os.path.exists(t.init_from):
    raise ValueError(f'train.init_from={t.init_from!r} does not exist; give the workdir of a '
                     'trained run of the same model and data, or leave it empty')
  if t.checkpoint and not os.path.exists(t.checkpoint):
    raise ValueError(f'train.checkpoint={t.checkpoint!r} does not exist; give the workdir of a '
                     'trained run, or leave it empty to train')
  e = config.eval
  config_utils.check_positive('eval.batch_size', e.batch_size, integer=True)
  config_utils.check_positive('eval.num_examples', e.num_examples, allow_zero=True, integer=True)
  config_utils.check_positive('eval.num_draws', e.num_draws, integer=True)
  if not e.defenses:
    raise ValueError("eval.defenses is empty; list at least one defense spec, e.g. ('none',)")
  for i, spec in enumerate(e.defenses):
    retrofit.make_transforms(config_utils.parse_spec(spec, field=f'eval.defenses[{i}]'),
                             field=f'eval.defenses[{i}]')
  from advdef import robustness  # Attacks are optional to import for clean-only use.
  robustness.validate_eval_config(e)
  model_summary.validate_vulnerability_config(e)
  # --- sweeps: eval.sweep (advdef.sweeps) ---
  defense_sweep.validate_sweep_config(e)
  # --- end sweeps ---


def prepare(config, workdir: str | None = None) -> tuple[data_lib.Splits, nn.Module]:
  """Everything that can fail on bad input, before any training compute: the config, the
  data, the model, each defense against the model's sites, and the workdir's checkpoints."""
  validate_config(config)
  splits = data_lib.load_dataset(config.data)
  model = runs.build_model(config, splits.info)
  placement = recipes.mask_placement(config)
  if placement is not None:  # every mask glob must name a conv_out/dense_in site
    pruning.masked_sites(placement, model.clone(hook=None), splits.info.image_shape)
  ckpt_dir = os.path.join(workdir or '', 'checkpoints')
  if workdir and os.path.isdir(ckpt_dir) and not config.train.checkpoint:
    with checkpointing.Checkpointer(ckpt_dir, fingerprint=training.fingerprint(
        config, splits.info)) as ckpt:
      ckpt.check_compatible()
  for i, spec in enumerate(config.eval.defenses):
    retrofit.validate_for_model(spec, model, splits.info.image_shape, field=f'eval.defenses[{i}]')
  retrofit.validate_for_model(config.train.defense, model, splits.info.image_shape,
                              field='train.defense')
  # --- sweeps: the swept defense's sites= glob must match this model ---
  defense_sweep.validate_for_model(config.eval, model, splits.info.image_shape)
  # --- end sweeps ---
  return splits, model


def run(config, workdir: str, *, progress: bool = True, prepared=None) -> dict[str, Any]:
  """Trains (or resumes / loads), evaluates and writes report.json, report.md and plots."""
  t0 = time.time()
  splits, model = prepared or prepare(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = metric_writers.MetricWriter(workdir, tensorboard=config.report.tensorboard)
  writer.write_hparams(config_utils.to_dict(config))
  try:
    if config.train.checkpoint:
      variables = training.load_trained_variables(config.train.checkpoint, config, model,
                                                  splits.info)
      summary = {'loaded_from': config.train.checkpoint}
    else:
      state, summary = training.train_and_evaluate(config, workdir, model, splits, writer=writer,
                                                   progress=progress and is_main)
      variables = training.variables_of(state)
  finally:
    writer.close()

  report = evaluate_run(config, model, variables, splits, workdir=workdir if is_main else None)
  report['training'] = summary
  report['wall_seconds'] = time.time() - t0
  if is_main:
    paths = reporting.write_report(workdir, report)
    metrics = metric_writers.read_metrics(workdir)
    if metrics:
      reporting.training_curves_plot(metrics, os.path.join(workdir, 'training_curves.png'))
    logging.info('Wrote %s', ', '.join(map(str, paths)))
  return report


def evaluate_run(config, model, variables, splits, workdir=None) -> dict[str, Any]:
  """Clean rows for every defense, then attack rows, worst cases and checks, and the model
  summary (sparsity, FLOPs, memory, vulnerability; the pruned export goes to workdir)."""
  from advdef import robustness
  images, labels = splits.test_images, splits.test_labels.astype(np.int32)
  if config.eval.num_examples:
    images, labels = images[:config.eval.num_examples], labels[:config.eval.num_examples]
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 3)
  rows = evaluation.evaluate_clean_rows(config, model, variables, images, labels,
                                        jax.random.fold_in(eval_key, 0))
  attack_rows, checks = robustness.evaluate_attacks(config, model, variables, images, labels,
                                                    jax.random.fold_in(eval_key, 1), rows)
  # --- sweeps: eval.sweep in one compiled call (advdef.sweeps) ---
  sweep_rows = defense_sweep.evaluate_sweeps(config, model, variables, images, labels,
                                      jax.random.fold_in(eval_key, 2))
  # --- end sweeps ---
  report = {
      'advdef_version': advdef.__version__,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'config': config_utils.to_dict(config),
      'dataset': f'{config.data.source}:{config.data.name}',
      'model': config.model.name,
      'rows': rows + attack_rows,
      'checks': checks,
      'notes': [],
  }
  if sweep_rows:  # --- sweeps ---
    report['sweeps'] = sweep_rows
  report['model_summary'] = model_summary.summarize(
      config, model, variables, images, labels, jax.random.fold_in(eval_key, 4), workdir)
  return report
