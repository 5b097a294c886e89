"""Scoring predictions: exact accuracy with calibration (ECE, NLL, Brier), Monte-Carlo
prediction for stochastic defenses, intervals. The evaluators (advdef.evaluators) build
their report rows with these.

Counts are exact: the last partial batch is padded and masked, never dropped. A stochastic
defense is scored on fresh draws: the accuracy of the prediction averaged over
`eval.num_draws` softmax draws, and the mean per-draw accuracy with a 95% interval.
Batches are split over the devices of the `config.parallel` mesh (advdef.parallel), the
model's variables replicated; the numbers do not depend on the device count.

  predict = make_predict_fn(logits_fn, stochastic=True, num_draws=100)
  row = score_predictions(predict, images_u8, labels, batch_size, key, stochastic=True)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advdef import data as data_lib
from advdef import defenses
from advdef import parallel

NUM_ECE_BINS = 15


def wilson_interval(successes: float, n: int, z: float = 1.96) -> list[float]:
  """95% Wilson score interval of a binomial proportion (good near 0 and 1)."""
  if n == 0:
    return [0.0, 1.0]
  p = successes / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return [max(0.0, center - half), min(1.0, center + half)]


@functools.partial(jax.jit, static_argnames='num_bins')
def calibration_sums(probs, labels, mask, num_bins=NUM_ECE_BINS):
  """Masked sufficient statistics for accuracy, NLL, Brier and ECE of probs [B, K]."""
  conf = jnp.max(probs, -1)
  pred = jnp.argmax(probs, -1)
  correct = (pred == labels) & mask
  p_true = jnp.take_along_axis(probs, labels[:, None], -1)[:, 0]
  nll = -jnp.log(jnp.maximum(p_true, 1e-12))
  brier = jnp.sum((probs - jax.nn.one_hot(labels, probs.shape[-1])) ** 2, -1)
  # Bin i holds confidences in (i/M, (i+1)/M]; confidence is >= 1/K > 0.
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  w = mask.astype(jnp.float32)
  return {
      'count': jnp.sum(w),
      'correct': jnp.sum(correct),
      'nll': jnp.sum(nll * w),
      'brier': jnp.sum(brier * w),
      'bin_count': jnp.zeros(num_bins).at[bins].add(w),
      'bin_conf': jnp.zeros(num_bins).at[bins].add(conf * w),
      'bin_correct': jnp.zeros(num_bins).at[bins].add(correct.astype(jnp.float32)),
  }


def finish_calibration(sums) -> dict[str, Any]:
  """Masked sums -> accuracy, nll, brier, ece (15 bins) and reliability-diagram bins."""
  sums = parallel.to_numpy(sums)
  n = float(sums['count'])
  counts = np.asarray(sums['bin_count'])
  nonzero = counts > 0
  conf = np.where(nonzero, sums['bin_conf'] / np.maximum(counts, 1), 0.0)
  acc = np.where(nonzero, sums['bin_correct'] / np.maximum(counts, 1), 0.0)
  ece = float(np.sum(counts / n * np.abs(acc - conf)))
  return {
      'n': int(n), 'accuracy': float(sums['correct']) / n, 'nll': float(sums['nll']) / n,
      'brier': float(sums['brier']) / n, 'ece': ece,
      'calibration_bins': {'confidence': conf.tolist(), 'accuracy': acc.tolist(),
                           'count': counts.astype(int).tolist()},
  }


def per_draw_summary(correct_per_draw: np.ndarray) -> dict[str, Any]:
  """Mean per-draw accuracy and its 95% t-interval over draws. correct_per_draw: [D, N]."""
  stats = defenses.per_draw_accuracy_interval(correct_per_draw)
  # A t-interval can cross 0 or 1 when few draws disagree; accuracies cannot.
  ci = None if stats['num_draws'] < 2 else [max(0.0, stats['ci95_low']),
                                             min(1.0, stats['ci95_high'])]
  return {'per_draw_accuracy': stats['mean'], 'per_draw_ci95': ci,
          'num_draws': stats['num_draws']}


def predict_probs(logits_fn: Callable, x, key, *, stochastic: bool, num_draws: int,
                  chunk_size: int | None = None):
  """A defense's decision rule: (mean_probs [B, K], per_draw_probs [D, B, K]). Traceable.

  Deterministic models use one pass (D = 1); stochastic ones average num_draws softmaxes,
  vectorized over keys.
  """
  if not stochastic:
    probs = jax.nn.softmax(logits_fn(x, key))
    return probs, probs[None]
  return defenses.mc_probabilities(logits_fn, key, x, num_draws=num_draws,
                                   chunk_size=chunk_size)


def make_predict_fn(logits_fn: Callable, *, stochastic: bool, num_draws: int,
                    chunk_size: int | None = None) -> Callable:
  """predict(x, key) -> predict_probs(...), jitted once."""
  return jax.jit(lambda x, key: predict_probs(logits_fn, x, key, stochastic=stochastic,
                                               num_draws=num_draws, chunk_size=chunk_size))


def num_batches(n: int, batch_size: int) -> int:
  """How many batches data.eval_batches yields for n examples (the last one padded)."""
  return -(-n // batch_size)


class BatchTicker:
  """Calls on_batch(done, total) as a loop's batches finish on the device.

  JAX dispatches asynchronously: a loop hands batch i+1 to the device before batch i has
  run, so a count of dispatched batches races ahead and then waits at the end. The ticker
  waits for batch i only once batch i+1 is dispatched, so the device always has the next
  batch queued and the count is of finished batches. With on_batch None it never waits.

    tick = BatchTicker(on_batch, num_batches(n, batch_size))
    for batch in ...:
      out = run(batch)
      tick(out)       # after dispatching; reports the previous batch once it is done
    tick.finish()     # reports the last one
  """

  def __init__(self, on_batch: Callable[[int, int], None] | None, total: int):
    self.on_batch, self.total = on_batch, total
    self.done = 0
    self._pending = None

  def __call__(self, outputs) -> None:
    if self.on_batch is None:
      return
    self._report()
    self._pending = (outputs,)

  def finish(self) -> None:
    if self.on_batch is not None:
      self._report()

  def _report(self):
    if self._pending is not None:
      jax.block_until_ready(self._pending[0])
      self._pending = None
      self.done += 1
      self.on_batch(self.done, self.total)


def score_predictions(predict, images, labels, batch_size, key, *, stochastic,
                      x_override: Callable | None = None,
                      return_correct: bool = False, mesh=None,
                      on_batch: Callable[[int, int], None] | None = None,
                      ensemble_sizes: Sequence[int] = ()) -> dict[str, Any]:
  """Runs predict over a split and returns the row fields (accuracy, ci95, calibration...).

  x_override(batch_index, batch) -> x lets attacked inputs replace the clean ones.
  return_correct adds '_correct': bool[N], per-example correctness of the (averaged)
  prediction, for per-example worst cases. With a mesh, every batch (and x) is split over
  its devices; batch_size must be a multiple of the device count. on_batch(done, total) is
  called as batches finish (BatchTicker), for progress displays.
  ensemble_sizes (stochastic only): adds 'ensemble', [{'draws': n, 'accuracy', 'ci95'}], the
  accuracy of the mean softmax of the first n of the same draws (RSE's ensemble-size study;
  nested, so the sizes share their draws).
  """
  sums, per_draw, correct_all = None, [], []
  sizes = tuple(int(n) for n in ensemble_sizes) if stochastic else ()
  ensemble_correct = {n: [] for n in sizes}
  tick = BatchTicker(on_batch, num_batches(images.shape[0], batch_size))
  for i, batch in enumerate(data_lib.eval_batches(images, labels, batch_size)):
    mask = np.asarray(batch['mask'])  # Host copy, before the batch is spread over devices.
    if mesh is not None:
      batch = parallel.shard_batch(batch, mesh)
    x = batch['image'] if x_override is None else x_override(i, batch)
    if mesh is not None:
      x = parallel.shard_batch(x, mesh)
    mean_probs, draw_probs = predict(x, jax.random.fold_in(key, i))
    s = calibration_sums(mean_probs, batch['label'], batch['mask'])
    if return_correct:
      correct_all.append(parallel.to_numpy(jnp.argmax(mean_probs, -1) == batch['label'])[mask])
    sums = s if sums is None else jax.tree_util.tree_map(jnp.add, sums, s)
    if stochastic:
      correct = parallel.to_numpy(jnp.argmax(draw_probs, -1) == batch['label'][None])
      per_draw.append(correct[:, mask])
      for n in sizes:
        guess = jnp.argmax(jnp.mean(draw_probs[:n], axis=0), -1)
        ensemble_correct[n].append(parallel.to_numpy(guess == batch['label'])[mask])
    tick(sums)
  tick.finish()
  row = finish_calibration(sums)
  row['ci95'] = wilson_interval(row['accuracy'] * row['n'], row['n'])
  if stochastic:
    row.update(per_draw_summary(np.concatenate(per_draw, axis=1)))
  if sizes:
    row['ensemble'] = []
    for n in sizes:
      c = np.concatenate(ensemble_correct[n])
      row['ensemble'].append({'draws': n, 'accuracy': float(np.mean(c)),
                              'ci95': wilson_interval(float(np.sum(c)), len(c))})
  if return_correct:
    row['_correct'] = np.concatenate(correct_all)
  return row
