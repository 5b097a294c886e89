"""Clean accuracy and calibration of every defense in eval.defenses, one report row each.

A stochastic defense is scored on fresh draws: the prediction averaged over eval.num_draws
softmax draws, and the mean per-draw accuracy with its 95% interval (advdef.evaluation).
"""

from __future__ import annotations

import time
from typing import Any

import jax

from advdef import evaluation
from advdef import parallel
from advdef import retrofit
from advdef.evaluators import base


def evaluate(ctx: base.Context) -> dict[str, Any]:
  """{'rows': one clean row per defense (accuracy, ci95, calibration, per-draw figures)}."""
  e = ctx.config.eval
  parallel.check_divisible(e.batch_size, ctx.mesh, 'eval.batch_size')
  variables = parallel.replicate(ctx.variables, ctx.mesh)
  key = ctx.key('clean')
  rows = []
  for d_index, defense in enumerate(ctx.plan.defenses):
    t0 = time.time()
    logits_fn = retrofit.make_logits_fn(ctx.model, variables, defense.hook)
    predict = evaluation.make_predict_fn(logits_fn, stochastic=defense.stochastic,
                                         num_draws=e.num_draws)
    row = evaluation.score_predictions(predict, ctx.images, ctx.labels, e.batch_size,
                                       jax.random.fold_in(key, d_index),
                                       stochastic=defense.stochastic, mesh=ctx.mesh)
    row.update(defense=defense.label, attack='none', norm=None, epsilon=None,
               stochastic=defense.stochastic, seconds=time.time() - t0)
    rows.append(row)
  return {'rows': rows}
