"""The benchmark's sweep section: an in-graph defense sweep in one call vs separate calls.

Imported by scripts/benchmark.py (section 5): `benchmark_kappa_sweep` times a JumpReLU kappa
grid evaluated by advdef.evaluators.defense_sweep's one vmapped compiled call against one
compiled call per value, each including its compilation.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from advdef import config_utils
from advdef import data as data_lib
from advdef import models
from advdef import runs
from advdef.evaluators import defense_sweep

DEFAULT_KAPPAS = tuple(round(0.2 * i, 1) for i in range(10))  # 0.0 .. 1.8


def _block(tree):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def time_sweep_vs_separate(model, variables, spec: defense_sweep.SweepSpec, images_u8, labels,
                           key, *, batch_size: int = 256, shard: bool = True) -> dict[str, Any]:
  """Wall time of the grid as one vmapped compiled call vs one compiled call per value.

  Both sides include their compilation, as a user pays it: the sweep compiles once, the
  separate evaluation compiles once per value (the value is a constant of each graph).
  Each side then runs once more, already compiled, for the steady-state times. Both sides
  compute the same counts (checked: counts_equal).

  Args:
    model, variables: a registry model and its variables.
    spec: the sweep (e.g. from defense_sweep.parse_sweep_config).
    images_u8: uint8[N, H, W, C]; labels: int[N].
    key: typed PRNG key.
    batch_size: examples per batch (the last batch is padded and masked).
    shard: shard the grid axis over devices when they divide it.

  Returns:
    dict(in_graph_seconds, separate_seconds, ratio = separate / in_graph, num_points,
    in_graph_run_seconds, separate_run_seconds (compiled, second run), num_examples,
    num_devices, sharded, counts_equal).
  """
  labels = np.asarray(labels).astype(np.int32)
  batches = list(data_lib.eval_batches(images_u8, labels, batch_size))
  keys = [jax.random.fold_in(key, i) for i in range(len(batches))]

  def run_grid(evaluator):
    out = [evaluator.batch_counts(b['image'], b['label'], b['mask'], k)
           for b, k in zip(batches, keys)]
    return np.sum(np.asarray(_block(out)), axis=0)  # [2, G]

  t0 = time.perf_counter()
  evaluator = defense_sweep.SweepEvaluator(model, variables, spec, shard=shard)
  grid = run_grid(evaluator)
  in_graph = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_grid(evaluator)
  in_graph_run = time.perf_counter() - t0

  def run_separate(fns):
    out = [[fn(b['image'], b['label'], b['mask'], k) for b, k in zip(batches, keys)]
           for fn in fns]
    return np.sum(np.asarray(_block(out)), axis=1).T  # [2, G]

  t0 = time.perf_counter()
  fns = [defense_sweep.separate_point_fn(model, variables, spec, v) for v in spec.values]
  separate = run_separate(fns)
  separate_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_separate(fns)
  separate_run = time.perf_counter() - t0
  counts_equal = bool(np.array_equal(grid, separate))
  if not counts_equal:
    print(f'[sweep_timing] in-graph and separate counts differ: {grid.tolist()} vs '
          f'{separate.tolist()}', file=sys.stderr, flush=True)
  return {'in_graph_seconds': in_graph, 'separate_seconds': separate_seconds,
          'ratio': separate_seconds / in_graph, 'num_points': len(spec.values),
          'in_graph_run_seconds': in_graph_run, 'separate_run_seconds': separate_run,
          'num_examples': int(labels.shape[0]), 'num_devices': jax.device_count(),
          'sharded': evaluator.mesh is not None, 'counts_equal': counts_equal}


def benchmark_kappa_sweep(workdir: str | None = None, *,
                          values: Sequence[float] = DEFAULT_KAPPAS,
                          attack: str = 'pgd(steps=10)', epsilon: float = 0.1,
                          num_examples: int = 200, batch_size: int = 200, norm: str = 'linf',
                          seed: int = 0, shard: bool = True) -> dict[str, Any]:
  """Times a JumpReLU kappa sweep (clean + robust accuracy) in one call vs separate calls.

  Args:
    workdir: a trained advdef run (e.g. the quick start's) whose model and test split are
      used; None uses a freshly initialised small_cnn on the bundled digits (offline, no
      training: the timing does not depend on the weights).
    values: the kappa grid (default 0.0, 0.2, ..., 1.8: ten points).
    attack: a fixed-budget attack spec, e.g. 'pgd(steps=10)'.
    epsilon: the attack budget in [0, 1] pixel units.
    num_examples: test examples evaluated (the first ones of the test split).
    batch_size: examples per compiled call.
    norm: 'linf' or 'l2'.
    seed: seed of the initialisation (workdir=None) and of the keys.
    shard: shard the grid over devices when their count divides len(values).

  Returns:
    dict(in_graph_seconds, separate_seconds, ratio, num_points) plus the steady-state
    in_graph_run_seconds / separate_run_seconds and num_examples, num_devices, sharded,
    counts_equal; see time_sweep_vs_separate. ratio > 1 means the in-graph sweep is faster.
  """
  if workdir:
    run = runs.load_run(workdir)
    model, variables, splits = run.model, run.variables, run.splits
  else:
    splits = data_lib.load_dataset(config_utils.base_config().data)
    info = splits.info
    model = models.create_model('small_cnn', num_classes=info.num_classes, mean=info.mean,
                                std=info.std)
    x0 = jnp.zeros((1, *info.image_shape), jnp.float32)
    variables = model.init({'params': jax.random.key(seed)}, x0, train=False)
  e = ml_collections.ConfigDict(dict(
      sweep=dict(defense='jump', param='kappa', values=tuple(values), fixed='', attack=attack,
                 epsilon=epsilon),
      norm=norm, num_draws=1, eot_samples=1))
  spec = defense_sweep.parse_sweep_config(e)
  images = splits.test_images[:num_examples]
  labels = splits.test_labels[:num_examples]
  return time_sweep_vs_separate(model, variables, spec, images, labels,
                                jax.random.key(seed + 1), batch_size=batch_size, shard=shard)
