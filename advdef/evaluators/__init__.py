"""Evaluators: what a run measures after training, each in its own module.

An evaluator is a function `evaluate(ctx: base.Context) -> dict` returning report sections
(`{'rows': [...]}`, `{'rows': [...], 'checks': [...]}`, `{'sweeps': [...]}`,
`{'model_summary': {...}}`). `eval.evaluators` lists which run, in order; each draws from
its own PRNG stream (advdef.rng.EVAL_STREAMS) and skips itself when its config is off.

  clean           clean accuracy and calibration of every defense
  attack_suite    the adaptive attack suite, worst cases and sanity checks (checks.py)
  defense_sweep   a grid of one defense hyperparameter in one compiled call
  model_summary   sparsity, FLOPs, memory, vulnerability, the pruned export

A new evaluator: a module with `evaluate(ctx)`, an entry in EVALUATORS and in
advdef.rng.EVAL_STREAMS, and (if it has config) a parse step in `parse_eval_config`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from advdef import parallel
from advdef import retrofit
from advdef import validate
from advdef.evaluators import attack_suite
from advdef.evaluators import base
from advdef.evaluators import clean
from advdef.evaluators import defense_sweep
from advdef.evaluators import model_summary

EVALUATORS: dict[str, Callable[[base.Context], dict[str, Any]]] = {
    'clean': clean.evaluate,
    'attack_suite': attack_suite.evaluate,
    'defense_sweep': defense_sweep.evaluate,
    'model_summary': model_summary.evaluate,
}


def parse_eval_config(e) -> base.EvalPlan:
  """Validates the eval section before any compute and parses its specs once."""
  if not e.evaluators:
    raise ValueError(f'eval.evaluators is empty; list some of: {", ".join(EVALUATORS)}')
  for i, name in enumerate(e.evaluators):
    validate.check_choice(f'eval.evaluators[{i}]', name, tuple(EVALUATORS))
  validate.check_positive('eval.batch_size', e.batch_size, integer=True)
  validate.check_positive('eval.num_examples', e.num_examples, allow_zero=True, integer=True)
  validate.check_positive('eval.num_draws', e.num_draws, integer=True)
  for i, n in enumerate(e.ensemble_sizes):
    validate.check_positive(f'eval.ensemble_sizes[{i}]', n, integer=True)
    if n > e.num_draws:
      raise ValueError(f'eval.ensemble_sizes[{i}]={n} exceeds eval.num_draws={e.num_draws}; '
                       'the ensembles are the first n of those draws')
  validate.check_choice('eval.transfer_attacks', e.transfer_attacks,
                        attack_suite.TRANSFER_ATTACKS)
  for i, t in enumerate(e.tolerances):
    validate.check_positive(f'eval.tolerances[{i}]', t, allow_zero=True)
  if not e.defenses:
    raise ValueError("eval.defenses is empty; list at least one defense spec, e.g. ('none',)")
  defenses = tuple(retrofit.parse_defense(spec, field=f'eval.defenses[{i}]')
                   for i, spec in enumerate(e.defenses))
  return base.EvalPlan(defenses=defenses,
                       attacks=attack_suite.parse_eval_attacks(e),
                       sweep=defense_sweep.parse_sweep_config(e),
                       vulnerability=model_summary.parse_vulnerability_config(e))


def make_context(config, model, variables, images, labels, *, plan: base.EvalPlan | None = None,
                 mesh=None, workdir: str | None = None) -> base.Context:
  """The Context evaluators take, for the experiment, notebooks and tests.

  images: uint8[N, H, W, C]; labels: int[N]. plan: config.eval parsed (parsed here when
  None); mesh: the data-parallel mesh (config.parallel's when None).
  """
  return base.Context(config=config, plan=plan or parse_eval_config(config.eval), model=model,
                      variables=variables, images=images,
                      labels=np.asarray(labels).astype(np.int32),
                      mesh=parallel.mesh_from_config(config) if mesh is None else mesh,
                      workdir=workdir)


def run_evaluators(ctx: base.Context) -> dict[str, Any]:
  """Runs eval.evaluators in order and merges their sections: lists concatenate
  ('rows', 'checks', 'sweeps'), anything else is set once."""
  report: dict[str, Any] = {'rows': [], 'checks': []}
  for name in ctx.config.eval.evaluators:
    for section, value in EVALUATORS[name](ctx).items():
      if isinstance(value, list):
        report.setdefault(section, []).extend(value)
      else:
        report[section] = value
  return report
