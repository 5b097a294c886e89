"""One experiment end to end: validate the config, train (or resume, or load a trained
checkpoint), run the evaluators, write the report.

  python -m advdef.main --config=configs/quickstart.py --workdir=/tmp/qs

  prepared = prepare(config, workdir)   # everything that can fail on bad input, no compute
  report = run(config, workdir, prepared=prepared)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from advdef import checkpointing
from advdef import compilation
from advdef import config_utils
from advdef import data as data_lib
from advdef import metric_writers
from advdef import models
from advdef import plots
from advdef import pruning
from advdef import recipes
from advdef import reporting
from advdef import retrofit
from advdef import runs
from advdef import training
from advdef import validate
from advdef import evaluators
from advdef.evaluators import base as evaluators_base


@dataclasses.dataclass(frozen=True)
class Config:
  """The config's spec strings, parsed once by `validate_config` and passed on."""
  recipe: recipes.Recipe
  train_defense: retrofit.DefenseSpec
  eval_plan: evaluators_base.EvalPlan


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` checked and loaded before any compute: the run starts from it."""
  parsed: Config
  splits: data_lib.Splits
  model: nn.Module


def validate_config(config) -> Config:
  """Fails fast, before any compute, with a message naming the field and the valid choices;
  returns the config's spec strings parsed."""
  data_lib.validate_data_config(config.data)
  validate.check_choice('model.name', config.model.name, sorted(models.MODELS))
  validate.check_choice('model.normalize', config.model.normalize, models.NORMALIZATIONS)
  t = config.train
  validate.check_positive('train.num_epochs', t.num_epochs, allow_zero=True, integer=True)
  validate.check_positive('train.batch_size', t.batch_size, integer=True)
  validate.check_choice('train.optimizer', t.optimizer, training.OPTIMIZERS)
  validate.check_choice('train.schedule', t.schedule, training.SCHEDULES)
  validate.check_positive('train.learning_rate', t.learning_rate)
  validate.check_positive('train.momentum', t.momentum, allow_zero=True)
  validate.check_positive('train.weight_decay', t.weight_decay, allow_zero=True)
  validate.check_positive('train.decay_factor', t.decay_factor)
  validate.check_positive('train.warmup_epochs', t.warmup_epochs, allow_zero=True)
  validate.check_probability('train.label_smoothing', t.label_smoothing)
  validate.check_positive('train.augment.crop_padding', t.augment.crop_padding,
                          allow_zero=True, integer=True)
  validate.check_positive('train.checkpoint_every_epochs', t.checkpoint_every_epochs,
                          allow_zero=True, integer=True)
  validate.check_positive('train.keep_checkpoints', t.keep_checkpoints, integer=True)
  validate.check_positive('train.log_every_steps', t.log_every_steps, integer=True)
  validate.check_positive('train.eval_every_epochs', t.eval_every_epochs, integer=True)
  for b in t.boundaries:
    validate.check_positive('train.boundaries', b)
  train_defense = retrofit.parse_defense(t.defense, field='train.defense')
  recipe = recipes.parse_recipe(t.recipe)
  recipe.placement(config.model.name)  # ANP/BP on a model without a default placement
  head_dropout = (config.model.kwargs or {}).get('head_dropout', 0.5)
  if recipe.uses_masks and config.model.name == 'vgg16_anp' and head_dropout != 0:
    # The authors' Beta-Bernoulli mode (ANP, ANP-VS, BP) skips the head dropouts.
    raise ValueError(f'train.recipe={recipe.name} on vgg16_anp needs '
                     f'model.kwargs.head_dropout=0.0 (got {head_dropout}): the ANP-VS code '
                     'turns the two head dropouts off for ANP and BP training')
  if t.init_from and not os.path.exists(t.init_from):
    raise ValueError(f'train.init_from={t.init_from!r} does not exist; give the workdir of a '
                     'trained run of the same model and data, or leave it empty')
  if t.checkpoint and not os.path.exists(t.checkpoint):
    raise ValueError(f'train.checkpoint={t.checkpoint!r} does not exist; give the workdir of a '
                     'trained run, or leave it empty to train')
  return Config(recipe=recipe, train_defense=train_defense,
                eval_plan=evaluators.parse_eval_config(config.eval))


def prepare(config, workdir: str | None = None) -> Prepared:
  """Everything that can fail on bad input, before any training compute: the config, the
  data, the model, each defense against the model's sites, and the workdir's checkpoints."""
  parsed = validate_config(config)
  splits = data_lib.load_dataset(config.data)
  shape = splits.info.image_shape
  model = runs.build_model(config, splits.info)
  placement = parsed.recipe.placement(config.model.name)
  if placement is not None:  # every mask glob must name a conv_out/dense_in site
    pruning.masked_sites(placement, model.clone(hook=None), shape)
  ckpt_dir = os.path.join(workdir or '', 'checkpoints')
  if workdir and os.path.isdir(ckpt_dir) and not config.train.checkpoint:
    with checkpointing.Checkpointer(ckpt_dir, fingerprint=training.fingerprint(
        config, splits.info)) as ckpt:
      ckpt.check_compatible()
  plan = parsed.eval_plan
  for i, defense in enumerate(plan.defenses):
    retrofit.validate_for_model(defense, model, shape, field=f'eval.defenses[{i}]')
  retrofit.validate_for_model(parsed.train_defense, model, shape, field='train.defense')
  if plan.sweep is not None:  # the swept defense's sites= glob must match this model
    evaluators.defense_sweep.validate_for_model(plan.sweep, model, shape)
  return Prepared(parsed=parsed, splits=splits, model=model)


def run(config, workdir: str, *, progress: bool = True,
        prepared: Prepared | None = None) -> dict[str, Any]:
  """Trains (or resumes / loads), evaluates and writes report.json, report.md and plots."""
  t0 = time.time()
  with compilation.CompileTimer() as timer:
    report, phase_seconds = _train_and_evaluate(config, workdir, progress, prepared)
  report['wall_seconds'] = time.time() - t0
  # How much went to compiling: on a small CPU run, most of it (README, Performance).
  report['timing'] = dict(timer.summary(), wall_seconds=report['wall_seconds'], **phase_seconds)
  if jax.process_index() == 0:
    paths = reporting.write_report(workdir, report)
    metrics = metric_writers.read_metrics(workdir)
    if metrics:
      plots.training_curves(metrics, os.path.join(workdir, 'training_curves.png'))
    logging.info('Wrote %s', ', '.join(map(str, paths)))
  return report


def _train_and_evaluate(config, workdir, progress, prepared):
  """(report, {'train_seconds', 'evaluate_seconds'})."""
  t0 = time.time()
  prepared = prepared or prepare(config)
  splits, model = prepared.splits, prepared.model
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = metric_writers.MetricWriter(workdir, tensorboard=config.report.tensorboard)
  writer.write_hparams(config_utils.to_dict(config))
  try:
    if config.train.checkpoint:
      variables = training.load_variables(
          config.train.checkpoint, model, splits.info,
          expected_fingerprint=training.fingerprint(config, splits.info))
      summary = {'loaded_from': config.train.checkpoint}
    else:
      state, summary = training.train_and_evaluate(
          config, workdir, model, splits, recipe=prepared.parsed.recipe, writer=writer,
          progress=progress and is_main)
      variables = training.variables_of(state)
  finally:
    writer.close()

  t1 = time.time()
  report = evaluate_run(config, prepared, variables, workdir=workdir if is_main else None)
  report['training'] = summary
  return report, {'train_seconds': t1 - t0, 'evaluate_seconds': time.time() - t1}


def evaluate_run(config, prepared: Prepared, variables, workdir=None) -> dict[str, Any]:
  """Runs the configured evaluators (advdef.evaluators) on the evaluation split (test, or
  validation with data.eval_split); the report."""
  images, labels = prepared.splits.test_images, prepared.splits.test_labels.astype(np.int32)
  if config.eval.num_examples:
    images, labels = images[:config.eval.num_examples], labels[:config.eval.num_examples]
  ctx = evaluators.make_context(config, prepared.model, variables, images, labels,
                               plan=prepared.parsed.eval_plan, workdir=workdir)
  report = reporting.new_report(config=config_utils.to_dict(config),
                                dataset=f'{config.data.source}:{config.data.name}'
                                + (' (validation split)'
                                   if prepared.splits.info.evaluation_split == 'validation'
                                   else ''),
                                model=config.model.name)
  report.update(evaluators.run_evaluators(ctx))
  return report
