"""The RSE section of RESULTS.md (advdef.reproduce.rse) rendered from synthetic finished runs:
per-example arrays stored as the attack suite stores them, the reference tolerance t*, the
paper-protocol and adaptive (per-example worst case) tolerance curves, each claim's verdict,
the tables and both figures. Every expected number is worked out by hand below."""

import os

import jax
import numpy as np
import pytest

from advdef import config_utils
from advdef import evaluation
from advdef import reproduce
from advdef.evaluators import results
from advdef.reproduce import frame
from advdef.reproduce import rse

RSE = 'rse(sigma_init=0.2,sigma_inner=0.1)'  # the report's label of configs/repro_rse.py's RSE
N = 20
# At the reference tolerance t* = 0.5 (see _undefended_cw), per model:
#   undefended        1/20 = 5.0%  [0.9, 23.6]
#   RSE, paper        16/20 = 80.0% [58.4, 91.9]   (+1draw breaks 0-3 within 0.5)
#   RSE, adaptive     10/20 = 50.0% [29.9, 70.1]   (+1draw 0-3, +eot4 0, 4-7: together 0-7;
#                                                  PGD-L2 at 0.5: 10, 11)
#   noise, paper      14/20 = 70.0% [48.1, 85.5]; adaptive 10/20 = 50.0% [29.9, 70.1]
#   PGD-AT            4/20 = 20.0%  [8.1, 41.6]


def _row(defense, attack, acc, *, n=N, eps=None, norm='l2', stochastic=False, **extra):
  row = {'defense': defense, 'attack': attack, 'norm': None if attack == 'none' else norm,
         'epsilon': eps, 'accuracy': acc, 'ci95': evaluation.wilson_interval(acc * n, n),
         'n': n}
  if stochastic:
    row['stochastic'] = True
  return dict(row, **extra)


def _cw(defense, attack, broken: dict, *, stochastic=False):
  """A C&W row and its arrays: broken maps example -> the norm at which fresh draws are fooled;
  the others are robust, with norm 0 (the attack failed and returned x)."""
  correct = np.ones(N, bool)
  norms = np.zeros(N, np.float32)
  for i, norm in broken.items():
    correct[i], norms[i] = False, norm
  row = _row(defense, attack, float(np.mean(correct)), stochastic=stochastic,
             success_rate=float(np.mean(~correct)))
  return row, {'correct': correct, 'perturbation_norm': norms}


def _fixed(defense, attack, eps, broken, *, norm='l2', stochastic=False, **extra):
  correct = np.ones(N, bool)
  correct[list(broken)] = False
  row = _row(defense, attack, float(np.mean(correct)), eps=eps, norm=norm,
             stochastic=stochastic, **extra)
  return row, {'correct': correct}


def _finish(run, rows_and_arrays):
  """Makes `run` finished: report.json's rows in run.report, and each attack row's arrays in
  <workdir>/eval_results written by the results store, as the attack suite writes them."""
  rows = [r for r, _ in rows_and_arrays]
  run.report = {'rows': rows, 'wall_seconds': 60.0}
  store = results.Store(os.path.join(run.workdir, results.RESULTS_DIR), 'synthetic',
                        active=True)
  for i, (row, arrays) in enumerate(rows_and_arrays):
    if arrays:
      key = {'defense': row['defense'], 'attack': row['attack'], 'epsilon': row['epsilon']}
      store.put('attack_suite', (0, i, 0), key, {'attack': jax.random.key(i)}, row, arrays)


def _ensemble(points, n=846):
  return [{'draws': d, 'accuracy': a, 'ci95': evaluation.wilson_interval(a * n, n)}
          for d, a in points]


def _labels(runs):
  """The attack labels the suite gives the l2 runs' C&W and PGD, and the linf runs' PGD."""
  l2 = runs.get('l2_rse').config.eval.attacks
  linf = runs.get('linf_rse').config.eval.attacks
  return (config_utils.spec_name(l2[0]), config_utils.spec_name(l2[1]),
          config_utils.spec_name(linf[0]))


def _synthetic_runs(tmp_path, *, pgd_at_broken=16, ensemble10=0.85):
  runs = frame.plan(reproduce.get_paper('rse'), 'cpu', str(tmp_path))
  cw, pgd, pgd_linf = _labels(runs)
  _finish(runs.get('plain'), [(_row('none', 'none', 0.80, n=846), None)])
  _finish(runs.get('rse'), [(_row(RSE, 'none', 0.86, n=846, stochastic=True, ensemble=_ensemble(
      [(1, 0.70), (5, 0.80), (10, ensemble10), (20, 0.86), (50, 0.86)])), None)])
  _finish(runs.get('pgd_at'), [(_row('none', 'none', 0.70, n=846), None)])
  # Undefended: 17 examples broken at 0.15, one at 0.25, one at 0.4, one robust. Accuracy at
  # 0.05 and 0.1: 100%; 0.2: 3/20 = 15%; 0.3: 2/20 = 10%, not below 10%; 0.5: 1/20 = 5%: t*.
  undefended = {**{i: 0.15 for i in range(3, 20)}, 1: 0.4, 2: 0.25}
  _finish(runs.get('l2_plain'), [
      (_row('none', 'none', 0.85), None),
      _cw('none', cw, undefended),
      _fixed('none', pgd, 0.5, range(0, 20)),
      (_row(RSE, 'none', 0.80, stochastic=True), None),
      _cw(RSE, cw + '+1draw', {i: 0.3 for i in range(6)}, stochastic=True),
      _cw(RSE, cw + '+eot4', {i: 0.3 for i in range(10)}, stochastic=True),
      _fixed(RSE, pgd + '+eot4', 0.5, range(12), stochastic=True),
  ])
  _finish(runs.get('l2_rse'), [
      (_row(RSE, 'none', 0.80, stochastic=True), None),
      # Broken within 0.5 by one draw per step: 0-3 (4 only at 0.75).
      _cw(RSE, cw + '+1draw', {0: 0.3, 1: 0.3, 2: 0.3, 3: 0.3, 4: 0.75}, stochastic=True),
      # By EOT: 0 and 4-7 (8 only at 1.0). Together 0-7: fewer robust than under either.
      _cw(RSE, cw + '+eot4', {0: 0.3, 4: 0.4, 5: 0.4, 6: 0.4, 7: 0.4, 8: 1.0},
          stochastic=True),
      _fixed(RSE, pgd + '+eot4', 0.5, (10, 11), stochastic=True),
  ])
  _finish(runs.get('l2_pgd_at'), [
      (_row('none', 'none', 0.75), None),
      _cw('none', cw, {i: 0.45 for i in range(pgd_at_broken)}),
      _fixed('none', pgd, 0.5, range(15)),
  ])
  _finish(runs.get('linf_rse'), [
      _fixed(RSE, pgd_linf + '+eot8', 8 / 255, range(15), norm='linf', stochastic=True,
             ensemble=_ensemble([(1, 0.20), (5, 0.25), (10, 0.25), (20, 0.25), (50, 0.25)],
                                n=N)),
  ])
  return runs


def _claims(runs):
  models = rse.gather(runs)
  tols = rse.tolerances(runs)
  return {row[0].split(' (')[0].split(' under C&W at')[0]: row
          for row in rse.claims(models, tols, runs.scale)}


def test_gather_reads_the_stored_per_example_arrays(tmp_path):
  runs = _synthetic_runs(tmp_path)
  models = rse.gather(runs)
  assert list(models) == ['undefended', 'noise at inference', 'RSE', 'PGD-AT']
  assert [m.stochastic for m in models.values()] == [False, True, True, False]
  m = models['RSE']
  assert [a.label.rsplit('+', 1)[1] for a in m.cw] == ['1draw', 'eot4']
  assert [a.paper_protocol for a in m.cw] == [True, False]
  assert m.cw[1].norms.dtype == np.float32 and m.cw[1].norms[8] == 1.0
  assert m.cw[0].correct.tolist() == [False] * 5 + [True] * 15
  assert m.clean_full['n'] == 846 and m.clean['n'] == N and len(m.l2) == 1
  assert rse.tolerances(runs) == (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def test_reference_tolerance_and_curves_at_it(tmp_path):
  runs = _synthetic_runs(tmp_path)
  models = rse.gather(runs)
  tols = rse.tolerances(runs)
  undefended = [c.accuracy for c in models['undefended'].curve(tols, True)]
  assert undefended == pytest.approx([1.0, 1.0, 0.15, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05])
  # 10% at 0.3 is not below 10%: t* is the next tolerance.
  assert rse.reference_tolerance(models, tols) == 0.5
  i = tols.index(0.5)
  paper, adaptive = (models['RSE'].curve(tols, p)[i] for p in (True, False))
  assert (paper.accuracy, paper.n) == (pytest.approx(16 / 20), N)
  assert adaptive.accuracy == pytest.approx(10 / 20)
  # Each row alone: +1draw 16/20, +eot4 15/20; the per-example worst case is lower than both.
  eot_only = np.mean(~(~models['RSE'].cw[1].correct & (models['RSE'].cw[1].norms <= 0.5)))
  assert eot_only == pytest.approx(15 / 20) and adaptive.accuracy < min(eot_only, 16 / 20)
  # Below PGD-L2's eps its rows do not count; beyond every norm: 0-8 and 10, 11 broken.
  assert models['RSE'].curve(tols, False)[i - 1].accuracy == pytest.approx(16 / 20)
  assert models['RSE'].curve(tols, False)[-1].accuracy == pytest.approx(9 / 20)
  # A deterministic model has one curve for both protocols.
  assert models['PGD-AT'].curve(tols, True) == models['PGD-AT'].curve(tols, False)
  assert models['PGD-AT'].curve(tols, True)[i].accuracy == pytest.approx(4 / 20)
  # Without the undefended model, or when it never drops below 10%, there is no t*.
  assert rse.reference_tolerance({k: v for k, v in models.items() if k != 'undefended'},
                                 tols) is None
  assert rse.reference_tolerance(models, tols[:4]) is None


def test_claims_give_each_verdict(tmp_path):
  claims = _claims(_synthetic_runs(tmp_path))
  drop = claims['Under C&W L2 within a distortion tolerance the unprotected VGG drops below 10%']
  assert 't* = 0.5' in drop[0]
  assert drop[3] == '5.0% [0.9, 23.6]' and drop[5] == '20' and drop[-1] == frame.REPRODUCED
  undefended = claims['RSE is more accurate than the unprotected model']
  assert undefended[3] == '80.0% [58.4, 91.9] vs undefended 5.0% [0.9, 23.6]'
  assert undefended[4] == '50.0% [29.9, 70.1] vs undefended 0.0% [0.0, 16.1]'
  assert undefended[-1] == frame.REPRODUCED
  # PGD-AT at 20% [8.1, 41.6]: below RSE's paper-protocol interval, overlapping the adaptive one.
  pgd_at = claims['RSE is more accurate than PGD adversarial training']
  assert pgd_at[3] == '80.0% [58.4, 91.9] vs PGD-AT 20.0% [8.1, 41.6]'
  assert pgd_at[4] == '50.0% [29.9, 70.1] vs PGD-AT 20.0% [8.1, 41.6]'
  assert pgd_at[-1] == frame.PAPER_ONLY
  # Noise at inference, paper 70% [48.1, 85.5]: above it but overlapping.
  noise = claims['RSE is more accurate than the same noise at inference only']
  assert noise[3] == '80.0% [58.4, 91.9] vs noise at inference 70.0% [48.1, 85.5]'
  assert noise[4] == '50.0% [29.9, 70.1] vs noise at inference 40.0% [21.9, 61.3]'
  assert noise[-1] == frame.INCONCLUSIVE
  keeps = claims['RSE keeps 86%']
  assert keeps[3] == '80.0% [58.4, 91.9]' and keeps[-1] == frame.NOT_COMPARABLE
  saturation = claims["The self-ensemble's clean accuracy saturates by about 10 draws"]
  assert saturation[3].startswith('n = 1: 70.0% [') and '; n = 10: 85.0% [' in saturation[3]
  assert '; n = 50: 86.0% [' in saturation[3] and saturation[5] == '846'
  assert saturation[-1] == frame.REPRODUCED  # 85% vs 86%: within 2 points
  clean = claims['The unprotected VGG-16 reaches 92% clean accuracy']
  assert clean[3] == '80.0% [77.2, 82.6]' and clean[-1] == frame.NOT_COMPARABLE


def test_claims_when_rse_is_not_better_or_the_ensemble_does_not_saturate(tmp_path):
  # PGD-AT broken on 3 examples (85%): RSE's paper-protocol 80% is not above it.
  claims = _claims(_synthetic_runs(tmp_path, pgd_at_broken=3, ensemble10=0.80))
  assert claims['RSE is more accurate than PGD adversarial training'][-1] == \
      frame.NOT_REPRODUCED
  assert claims["The self-ensemble's clean accuracy saturates by about 10 draws"][-1] == \
      frame.NOT_REPRODUCED  # 80% at n = 10 vs 86% at n = 50


def test_claims_of_experiments_not_run(tmp_path):
  runs = _synthetic_runs(tmp_path)
  for name in ('plain', 'l2_plain', 'rse'):
    runs.get(name).report = None
  claims = _claims(runs)
  drop = claims['Under C&W L2 within a distortion tolerance the unprotected VGG drops below 10%']
  assert 't*: none of the tolerances' in drop[0] and drop[-1] == frame.NOT_RUN
  assert claims['RSE is more accurate than the unprotected model'][-1] == frame.NOT_RUN
  assert claims["The self-ensemble's clean accuracy saturates by about 10 draws"][-1] == \
      frame.NOT_RUN
  assert claims['The unprotected VGG-16 reaches 92% clean accuracy'][-1] == frame.NOT_RUN


def test_render_section_tables_and_figures(tmp_path):
  runs = _synthetic_runs(tmp_path)
  cw, pgd, pgd_linf = _labels(runs)
  section = rse.render(runs, 'results/rse')
  md = section.markdown
  assert md.startswith('## RSE (Liu et al., ECCV 2018): scale `cpu`')
  assert '### Claims' in md and frame.PAPER_ONLY in md and frame.INCONCLUSIVE in md
  assert '(7 of 9 experiments finished' in md
  assert '- Not finished yet: linf_plain, linf_pgd_at.' in md
  header = ('| model | C&W | t = 0.05 | t = 0.1 | t = 0.2 | t = 0.3 | t = 0.5 | t = 0.75 | '
            't = 1 | t = 1.5 | t = 2 | n |')
  assert header in md
  table = md[md.index(header):]
  table = table[:table.index('\n\n')].splitlines()
  rows = {tuple(c.strip() for c in line.strip('|').split(' | ')[:2]): line for line in table[2:]}
  white, paper = 'white-box', "one draw per step (the authors' attack)"
  worst = ('per-example worst of every C&W row (1 draw, EOT, transfer) and of PGD-L2 at t >= '
           'its eps')
  both = 'per-example worst of C&W and of PGD-L2 at t >= its eps'
  assert set(rows) == {('undefended', white), ('undefended', both), ('noise at inference', paper),
                       ('noise at inference', worst), ('RSE', paper), ('RSE', worst),
                       ('PGD-AT', white), ('PGD-AT', both)}
  cells = lambda key: [c.strip() for c in rows[key].strip('|').split(' | ')]
  # t = 0.5 is the 7th cell; t = 0.75 the 8th (RSE's +1draw breaks example 4 at 0.75).
  assert cells(('undefended', white))[4:7] == ['15.0% [5.2, 36.0]', '10.0% [2.8, 30.1]',
                                                     '5.0% [0.9, 23.6]']
  assert cells(('RSE', "one draw per step (the authors' attack)"))[6:8] == [
      '80.0% [58.4, 91.9]', '75.0% [53.1, 88.8]']
  assert cells(('RSE', worst))[6] == '50.0% [29.9, 70.1]'
  assert cells(('RSE', worst))[-1] == '20'
  # The L2 budget table: C&W within 0.5 (0-7 broken) and the worst case with PGD (10, 11).
  assert f'| RSE | {pgd}+eot4 | — | 90.0% [69.9, 97.2] | 20 |' in md
  assert '| RSE | C&W within 0.5 | minimum-perturbation, judged on fresh draws | 60.0% | 20 |' \
      in md
  assert '| RSE | **worst case** (per example) | all of the above | **50.0% [29.9, 70.1]** | 20 |' \
      in md
  # The ensemble table: the clean split and the L-inf EOT row.
  assert '| model | scored on | n = 1 | n = 5 | n = 10 | n = 20 | n = 50 | n (examples) |' in md
  assert f'| RSE | {pgd_linf}+eot8 at 8/255 | 20.0% [8.1, 41.6] |' in md
  assert '| RSE | clean, whole test split | 70.0% [' in md
  assert '![accuracy against the C&W tolerance](results/rse/tolerance.png)' in md
  assert '![accuracy against the ensemble size](results/rse/ensemble.png)' in md
  assert 'Data: `npz:cifar10_partial`, 4,660 training / 846 test images' in md
  assert set(section.figures) == {'tolerance.png', 'ensemble.png'}
  assert all(png.startswith(b'\x89PNG') for png in section.figures.values())


def test_render_with_nothing_finished(tmp_path):
  runs = frame.plan(reproduce.get_paper('rse'), 'cpu', str(tmp_path))
  section = rse.render(runs, 'results/rse')
  assert 'No C&W run has finished.' in section.markdown
  assert 'No ensemble-size result yet.' in section.markdown
  assert section.figures == {'tolerance.png': None, 'ensemble.png': None}
  assert '(0 of 9 experiments finished' in section.markdown


def test_the_drop_claim_is_not_run_while_the_undefended_cw_run_is_unfinished(tmp_path):
  runs = _synthetic_runs(tmp_path)
  runs.get('l2_plain').report = None
  drop = _claims(runs)['Under C&W L2 within a distortion tolerance the unprotected VGG drops '
                       'below 10%']
  assert drop[3] == '—'
  assert drop[-1] == frame.NOT_RUN
