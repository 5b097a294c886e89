"""Sanity checks of one defense's attack results (Carlini et al. 2019; AutoAttack's flags).

Each check is pass / warn / fail with a one-line detail, in report['checks']:
  accuracy_monotone_in_eps, large_eps_collapse, iterative_beats_single_step,
  white_box_beats_transfer, square_not_better_than_gradient, convergence,
  gradient_health, randomness_detected, fixed_randomness.
Run by advdef.evaluators.attack_suite after a defense's attack rows, on the same examples.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import data as data_lib
from advdef import parallel
from advdef.evaluators import base

LARGE_EPS = {'linf': 0.5}  # Carlini et al.: no classifier beats chance at L-inf 0.5.


def _clean_batches(images, labels, batch_size):
  return [b['image'] for b in data_lib.eval_batches(images, labels, batch_size)]


def _input_gradient_and_logits(logits_fn, x, y, key):
  """(d sum(margin) / dx float32[B, H, W, C], logits float32[B, K]) of one pass with `key`."""
  def margin_sum(x):
    logits = logits_fn(x, key)
    return jnp.sum(attacks.margin(logits, y)), logits
  grad, logits = jax.grad(margin_sum, has_aux=True)(x)
  return grad, logits


def _slack(accuracy: float, n: int, stochastic: bool) -> float:
  """Tolerance for comparing two accuracies on n examples: MC noise for stochastic models."""
  se = math.sqrt(max(accuracy * (1 - accuracy), 1.0 / n) / n)
  return max(0.01, 2 * se) if stochastic else 0.01


def _family(attack_label: str) -> str:
  """'pgd(steps=10)+eot4' -> 'pgd'."""
  return attack_label.split('(')[0].split('+')[0]


def _check(defense, name, status, detail):
  return {'defense': defense, 'name': name, 'status': status, 'detail': detail}


def run_checks(e, defense, plans, images, labels, d_rows, per_example, scorer, crafters, key,
               undefended_rows, report=None) -> list[dict]:
  """The sanity checks for one defense; see the module docstring.

  Args:
    e: the eval config. defense: the retrofit.DefenseSpec evaluated; plans: its attack plans.
    images, labels: the attacked examples; d_rows: their attack rows; per_example: per
      (attack label, eps) bool[n] robust-correctness; scorer, crafters: the suite's own.
    key: the checks' PRNG key. undefended_rows: the 'none' defense's rows, if evaluated.
    report: report(phase) -> on_batch(done, total) of a phase's batch loop, for progress
      displays (evaluators.base.batch_reporter); None shows nothing.
  """
  report = report or (lambda phase: None)
  defense_spec, spec = defense, defense.text
  defense = defense.label
  n = len(labels)
  stochastic = scorer.stochastic
  out = []
  keys = iter(jax.random.split(key, 8))
  eps_rows = [r for r in d_rows if r['epsilon'] is not None]

  # 1. Accuracy does not rise with epsilon, per attack.
  if len(e.epsilons) > 1 and eps_rows:
    bad = []
    for label in dict.fromkeys(r['attack'] for r in eps_rows):
      series = sorted((r['epsilon'], r['accuracy']) for r in eps_rows if r['attack'] == label)
      for (e0, a0), (e1, a1) in zip(series, series[1:]):
        if a1 > a0 + _slack(a0, n, stochastic):
          bad.append(f'{label}: {a0:.3f} at {e0:.4g} -> {a1:.3f} at {e1:.4g}')
    out.append(_check(defense, 'accuracy_monotone_in_eps', 'fail' if bad else 'pass',
                      '; '.join(bad) if bad else 'non-increasing for every attack'))

  main = next((p for p in plans if p.name in base.ITERATIVE_ATTACKS and p.craft.text == spec),
              None)
  clean_batches = _clean_batches(images, labels, crafters.batch_size)

  # 2. Accuracy near chance at a large epsilon (L-inf 0.5).
  if main is not None and e.norm in LARGE_EPS:
    adv, _ = crafters.craft(main, images, labels, next(keys), LARGE_EPS[e.norm],
                            on_batch=report('large_eps_collapse: attack'))
    acc = scorer(images, labels, adv, on_batch=report('large_eps_collapse: scoring'))['accuracy']
    chance = 1.0 / max(int(jnp.max(labels)) + 1, 2)
    status = 'pass' if acc <= chance + 0.05 else 'fail'
    out.append(_check(defense, 'large_eps_collapse', status,
                      f'{main.label} at {e.norm} eps={LARGE_EPS[e.norm]}: accuracy {acc:.3f} '
                      f'(chance {chance:.3f})'))

  # 3. Iterative beats single-step.
  fgsm_rows = [r for r in eps_rows if r['attack'].startswith('fgsm') and 'transfer' not in
               r['attack']]
  iter_rows = [r for r in eps_rows if _family(r['attack']) in base.ITERATIVE_ATTACKS
               and 'transfer' not in r['attack']]
  if fgsm_rows and iter_rows:
    bad = []
    for eps in e.epsilons:
      f = min((r['accuracy'] for r in fgsm_rows if r['epsilon'] == eps), default=None)
      it = min((r['accuracy'] for r in iter_rows if r['epsilon'] == eps), default=None)
      if f is not None and it is not None and it > f + _slack(f, n, stochastic):
        bad.append(f'eps={eps:.4g}: iterative {it:.3f} > single-step {f:.3f}')
    out.append(_check(defense, 'iterative_beats_single_step', 'fail' if bad else 'pass',
                      '; '.join(bad) if bad else 'the best iterative attack is at least as '
                      'strong as FGSM at every epsilon'))

  # 4. White-box beats transfer, per example.
  transfer = [k for k in per_example if 'transfer' in k[0]]
  if transfer:
    details, status = [], 'pass'
    for label, eps in transfer:
      white = [per_example[(l, eps)] for (l, e2) in per_example
               if e2 == eps and 'transfer' not in l]
      if not white:
        continue
      white_robust = np.logical_and.reduce(white)
      only_transfer = float(np.mean(white_robust & ~per_example[(label, eps)]))
      if only_transfer > _slack(0.0, n, stochastic):
        status = 'warn'
      details.append(f'eps={eps:.4g}: {only_transfer:.1%} of examples fall only to {label}')
    out.append(_check(defense, 'white_box_beats_transfer', status, '; '.join(details)))

  # 5. Square (gradient-free) does not beat the gradient attacks.
  square_rows = [r for r in eps_rows if r['attack'].startswith('square')]
  grad_rows = [r for r in eps_rows if _family(r['attack']) in base.GRADIENT_ATTACKS
               and 'transfer' not in r['attack']]
  if square_rows and grad_rows:
    bad = []
    for eps in e.epsilons:
      s = min((r['accuracy'] for r in square_rows if r['epsilon'] == eps), default=None)
      g = min((r['accuracy'] for r in grad_rows if r['epsilon'] == eps), default=None)
      if s is not None and g is not None and s < g - max(0.002, _slack(g, n, stochastic) - 0.01):
        bad.append(f'eps={eps:.4g}: Square {s:.3f} < gradient {g:.3f}')
    out.append(_check(defense, 'square_not_better_than_gradient', 'warn' if bad else 'pass',
                      '; '.join(bad) + ' (gradients may be masked: try BPDA or more EOT)' if bad
                      else 'gradient attacks are at least as strong as Square'))

  # 6. Convergence: doubling steps, restarts and EOT samples changes little.
  if main is not None and e.epsilons:
    # The most informative epsilon: where the attack leaves accuracy closest to 50%.
    eps = min(e.epsilons, key=lambda v: abs(next(
        r['accuracy'] for r in d_rows if r['attack'] == main.label and r['epsilon'] == v) - 0.5))
    doubled = dict(main.kwargs)
    for field, default in (('steps', 10), ('restarts', 1), ('eot_samples', 1)):
      if field in doubled or (field == 'steps' and base.accepts(main.name, 'steps')):
        doubled[field] = 2 * doubled.get(field, inspect.signature(
            attacks.ATTACKS[main.name]).parameters[field].default)
    twice = dataclasses.replace(main, kwargs=doubled, label=main.label + ' x2')
    adv, _ = crafters.craft(twice, images, labels, next(keys), eps,
                            on_batch=report('convergence: attack'))
    acc2 = scorer(images, labels, adv, on_batch=report('convergence: scoring'))['accuracy']
    acc1 = next(r['accuracy'] for r in d_rows if r['attack'] == main.label and
                r['epsilon'] == eps)
    ok = abs(acc2 - acc1) <= _slack(acc1, n, stochastic)
    changed = ', '.join(f'{k}={v}' for k, v in doubled.items() if main.kwargs.get(k) != v)
    out.append(_check(defense, 'convergence', 'pass' if ok else 'warn',
                      f'{main.label} at eps={eps:.4g}: {acc1:.3f}; with {changed}: {acc2:.3f}'))

  # 7. Gradient health: share of zero or NaN input gradients (margin loss, one draw). The same
  # program returns that pass's logits for check 8, so each defense compiles one program for
  # both (a SAP program costs seconds to compile; see advdef.defenses).
  g_key = next(keys)
  probe = crafters.compile(defense_spec, _input_gradient_and_logits, 'input_gradients')
  zero, nan, total = 0, 0, 0
  on_batch = report('gradient_health')
  num_batches = len(clean_batches)
  for i, batch in enumerate(data_lib.eval_batches(images, labels, crafters.batch_size)):
    mask = np.asarray(batch['mask'])
    batch = crafters.shard(batch)
    if i == 0:
      first = batch  # check 8's batch
    g = parallel.to_numpy(probe(batch['image'], batch['label'], jax.random.fold_in(g_key, i))[0])
    g = g[mask].reshape(int(np.sum(mask)), -1)
    nan += int(np.sum(~np.all(np.isfinite(g), axis=1)))
    zero += int(np.sum(np.all(g == 0, axis=1)))
    total += len(g)
    if on_batch:
      on_batch(i + 1, num_batches)
  status = 'fail' if nan else ('warn' if zero / total > 0.01 else 'pass')
  out.append(_check(defense, 'gradient_health', status,
                    f'{zero / total:.1%} of examples have an all-zero input gradient, '
                    f'{nan / total:.1%} a NaN or infinite one'
                    + (' (use BPDA or gradient-free attacks)' if zero / total > 0.01 else '')))

  # 8. Randomness detected iff the defense is declared stochastic (AutoAttack: 5 passes).
  outs = [parallel.to_numpy(probe(first['image'], first['label'], k)[1])
          for k in jax.random.split(next(keys), 5)]
  varies = any(np.max(np.abs(o - outs[0])) > 1e-4 for o in outs[1:])
  out.append(_check(defense, 'randomness_detected', 'pass' if varies == stochastic else 'fail',
                    f'logits {"vary" if varies else "do not vary"} over 5 passes; the defense is '
                    f'declared {"stochastic" if stochastic else "deterministic"}'))

  # 9. Fixed randomness: with its draws frozen, the model should fall like the undefended one.
  if stochastic and main is not None and e.epsilons:
    eps = max(e.epsilons)
    frozen_key = next(keys)
    fn = attacks.ATTACKS[main.name]
    kwargs = {k: v for k, v in main.kwargs.items() if k != 'eot_samples'}

    def attack_frozen(logits_fn, x, y, k):
      frozen_fn = attacks.fixed_randomness(logits_fn, frozen_key)
      x_adv = fn(frozen_fn, k, x, y, eps=eps, **kwargs)
      return jnp.argmax(frozen_fn(x_adv, None), -1)

    run = crafters.compile(defense_spec, attack_frozen, f'{main.name}_frozen_randomness')
    correct, attack_key = [], next(keys)
    on_batch = report('fixed_randomness: attack')
    for i, batch in enumerate(data_lib.eval_batches(images, labels, crafters.batch_size)):
      mask = np.asarray(batch['mask'])
      batch = crafters.shard(batch)
      pred = run(batch['image'], batch['label'], jax.random.fold_in(attack_key, i))
      correct.append(parallel.to_numpy((pred == batch['label']) & batch['mask'])[mask])
      if on_batch:
        on_batch(i + 1, num_batches)
    frozen_acc = float(np.mean(np.concatenate(correct)))
    baseline = None
    if undefended_rows:
      baseline = min((r['accuracy'] for r in undefended_rows
                      if r['epsilon'] == eps and r['attack'].startswith(main.base)), default=None)
    if baseline is None:
      status, ref = 'warn', 'no undefended baseline in eval.defenses to compare with'
    else:
      status = 'pass' if frozen_acc <= baseline + 0.1 else 'warn'
      ref = f'undefended model under {main.base}: {baseline:.3f}'
    out.append(_check(defense, 'fixed_randomness', status,
                      f'{main.name} at eps={eps:.4g} with the draws frozen: accuracy '
                      f'{frozen_acc:.3f}; {ref}'))
  return out
