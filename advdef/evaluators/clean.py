"""Clean accuracy and calibration of every defense in eval.defenses, one report row each.

A stochastic defense is scored on fresh draws: the prediction averaged over eval.num_draws
softmax draws, and the mean per-draw accuracy with its 95% interval (advdef.evaluation).
Each row is stored as it finishes (advdef.evaluators.results) and reused by a rerun.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from advdef import evaluation
from advdef import parallel
from advdef.evaluators import base
from advdef.evaluators import results


def evaluate(ctx: base.Context) -> dict[str, Any]:
  """{'rows': one clean row per defense (accuracy, ci95, calibration, per-draw figures)}."""
  e = ctx.config.eval
  parallel.check_divisible(e.batch_size, ctx.mesh, 'eval.batch_size')
  variables = parallel.replicate(ctx.variables, ctx.mesh)
  key = ctx.key('clean')
  store = results.open_store(ctx)
  defenses = ctx.plan.defenses
  rows = []
  with base.progress('clean') as bar:
    for d_index, defense in enumerate(defenses):
      row_key = jax.random.fold_in(key, d_index)
      entry_key = {'defense': defense.text, 'num_draws': e.num_draws}
      entry = store.get('clean', (d_index,), entry_key, {'score': row_key})
      reused = entry is not None
      if reused:
        bar.skip()
      else:
        t0 = time.time()
        predict = base.predict_program(ctx, variables, defense)
        row = evaluation.score_predictions(
            predict, ctx.images, ctx.labels, base.eval_batch_size(ctx), row_key,
            stochastic=defense.stochastic, mesh=ctx.mesh, ensemble_sizes=e.ensemble_sizes,
            on_batch=base.batch_reporter(bar, d_index, len(defenses), defense.label, 'scoring'))
        row.update(defense=defense.label, attack='none', norm=None, epsilon=None,
                   stochastic=defense.stochastic, seconds=time.time() - t0)
        entry = store.put('clean', (d_index,), entry_key, {'score': row_key}, row)
      row = entry.value
      rows.append(row)
      base.log(f'clean | {defense.label}: accuracy {row["accuracy"]:.3f} '
               f'({base.row_seconds(row, reused)}), '
               f'{bar.summary(d_index + 1, len(defenses))}', bar)
  return {'rows': rows}
