"""The named PRNG streams of a run, in one place.

Every random draw of a run comes from `jax.random.key(config.seed)` through these streams:
training folds in `RUN_STREAMS['init' | 'train' | 'data']`, evaluation folds in
`RUN_STREAMS['eval']` and then its evaluator's `EVAL_STREAMS[name]`. Inside a stream,
callers `fold_in` a step or batch index. The numbers are frozen: they make a run (and its
report) reproducible from its config across advdef versions, so a new stream takes a new
number and no number is ever reused.
"""

from __future__ import annotations

import jax

RUN_STREAMS = {'init': 0, 'train': 1, 'data': 2, 'eval': 3}
EVAL_STREAMS = {'clean': 0, 'attack_suite': 1, 'defense_sweep': 2, 'model_summary': 4}


def run_key(seed: int, stream: str) -> jax.Array:
  """The key of one of the run's streams (RUN_STREAMS)."""
  return jax.random.fold_in(jax.random.key(seed), RUN_STREAMS[stream])


def eval_key(seed: int, evaluator: str) -> jax.Array:
  """The key of one evaluator (EVAL_STREAMS), independent of training and of the others."""
  return jax.random.fold_in(run_key(seed, 'eval'), EVAL_STREAMS[evaluator])
