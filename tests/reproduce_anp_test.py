"""The ANP-VS reproduction: the smoke scale end to end through scripts/reproduce.py (runs,
RESULTS.md section, figures, a rerun that skips every run), every experiment config of every
scale, the section rendered from synthetic reports (each verdict, the validation selection
rule), and model_summary's per-feature vulnerability against a direct computation."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import conftest

from advdef import evaluation
from advdef import experiment
from advdef import models
from advdef import pruning
from advdef import reproduce
from advdef.evaluators import model_summary
from advdef.reproduce import anp
from advdef.reproduce import frame

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'reproduce.py'
CPU_BUDGET_MINUTES = 56


def _script(*args, timeout=600):
  env = conftest.subprocess_env()
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _section(text):
  begin, end = frame.markers('anp')
  assert text.count(begin) == 1 and text.count(end) == 1, text
  return text[text.index(begin):text.index(end)]


@pytest.mark.slow
def test_smoke_scale_end_to_end_then_a_rerun_skips_every_run(tmp_path):
  results = tmp_path / 'RESULTS.md'
  other = '<!-- paper:sap begin -->\nSAP section, kept as it is\n<!-- paper:sap end -->\n'
  results.write_text('# Reproductions\n\n' + other)
  root = tmp_path / 'runs'
  first = _script('--paper=anp', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert first.returncode == 0, first.stdout + first.stderr
  lines = [l for l in first.stdout.splitlines() if l.startswith('[anp smoke ')]
  names = ('mnist_standard', 'mnist_anpvs_0.001', 'mnist_anpvs_0.001_test')
  assert len(lines) == 3 and all('done in' in l for l in lines), lines
  assert all(f'[anp smoke {k}/3] {n}' in l for k, (n, l) in enumerate(zip(names, lines), 1))

  text = results.read_text()
  assert other.strip() in text
  section = _section(text)
  for head in ('### Selection on the MNIST validation split', '### Claims: MNIST',
               "### MNIST, LeNet-5-Caffe: the paper's table", '### Run time'):
    assert head in section, head
  assert '| ANP-VS (λ = 0.001) |' in section and '**selected**' in section
  for png in ('vulnerability.png', 'accuracy.png'):
    assert (tmp_path / 'results' / 'anp' / png).stat().st_size > 1000
    assert f'](results/anp/{png})' in section
  # The training runs evaluated on the validation split, the test run on the test split.
  train = json.loads((root / 'anp' / 'mnist_anpvs_0.001' / 'report.json').read_text())
  test = json.loads((root / 'anp' / 'mnist_anpvs_0.001_test' / 'report.json').read_text())
  assert train['config']['data']['eval_split'] == 'validation'
  assert test['config']['data']['eval_split'] == 'test'
  # The per-feature vulnerability: the mean over a site's units is its term of the mean V.
  v = test['model_summary']['vulnerability']
  per_feature = v['white_box_per_feature']
  assert [f['site'] for f in per_feature] == ['act1', 'act2', 'act3']
  assert [len(f['vulnerability']) for f in per_feature] == [20, 50, 500]
  np.testing.assert_allclose(np.mean([np.mean(f['vulnerability']) for f in per_feature]),
                             v['white_box_vulnerability'], rtol=1e-4)
  assert 'black_box_vulnerability' in v  # (the base model is the smoke scale's source)
  reports = {n: (root / 'anp' / n / 'report.json').stat().st_mtime_ns for n in names}

  again = _script('--paper=anp', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert again.returncode == 0, again.stdout + again.stderr
  lines = [l for l in again.stdout.splitlines() if l.startswith('[anp smoke ')]
  assert len(lines) == 3 and all('skipped, finished' in l for l in lines), lines
  assert {n: (root / 'anp' / n / 'report.json').stat().st_mtime_ns for n in names} == reports
  assert _section(results.read_text()) == section


@pytest.mark.parametrize('scale', frame.SCALES)
def test_every_experiment_config_validates(scale, tmp_path, monkeypatch):
  shared = ROOT.parent / 'shared' / 'data'
  if scale == 'cpu' and not (shared / 'cifar10_partial.npz').exists():
    pytest.skip('../shared/data is absent')
  monkeypatch.chdir(ROOT)
  runs = frame.plan(reproduce.get_paper('anp'), scale, str(tmp_path))
  for needs in {r.experiment.needs for r in runs.runs if r.experiment.needs} | {'mnist_at'}:
    os.makedirs(frame.workdir(str(tmp_path), runs.paper, needs), exist_ok=True)
  for run in runs.runs:
    experiment.validate_config(run.config)
    assert run.estimate_s > 0
    c = run.config
    if run.experiment.kind in ('train', 'test'):  # MNIST: one data config, two splits
      assert c.data.validation_fraction == 0.1
      assert c.data.eval_split == ('validation' if run.experiment.kind == 'train' else 'test')
    if run.experiment.kind == 'test':
      assert c.train.checkpoint == frame.workdir(str(tmp_path), runs.paper,
                                                 run.experiment.needs)
      source = c.eval.vulnerability.source
      assert source == ('' if run.experiment.model == 'at' else frame.workdir(
          str(tmp_path), runs.paper, 'mnist_standard' if scale == 'smoke' else 'mnist_at'))
    if c.model.name == 'vgg16_anp' and run.experiment.model in ('bp', 'anpvs'):
      assert c.model.kwargs.head_dropout == 0.0
  names = [r.experiment.name for r in runs.runs]
  if scale == 'smoke':
    assert names == ['mnist_standard', 'mnist_anpvs_0.001', 'mnist_anpvs_0.001_test']
  else:
    assert {'mnist_anpvs_0.001', 'mnist_anpvs_0.01', 'mnist_anpvs_0.01_test'} <= set(names)
    # CIFAR-10 runs at full scale only (the cpu budget does not train vgg16_anp past chance).
    assert ('cifar_anpvs' in names) == (scale == 'full')
  if scale == 'cpu':
    assert sum(r.estimate_s for r in runs.runs) <= CPU_BUDGET_MINUTES * 60


# ----------------------------------------------------------------------------------------
# The section from synthetic reports.


def _row(attack, acc, n=200, **extra):
  return dict({'defense': 'none', 'attack': attack, 'norm': None if attack == 'none' else 'linf',
               'epsilon': None if attack == 'none' else 0.3, 'accuracy': acc,
               'ci95': evaluation.wilson_interval(acc * n, n), 'n': n}, **extra)


PGD = 'pgd(steps=40,step_size=0.01,unroll=True)'


def _report(clean, pgd, worst=None, *, n=200, summary=None, bb=None):
  rows = [_row('none', clean, n=2000), _row(PGD, pgd, n)]
  if worst is not None:
    rows += [_row('apgd(loss=dlr,steps=50)', worst, n),
             _row('worst_case', worst, n, worst_case=True, attacks=[PGD, 'apgd']),]
  s = dict(summary or {})
  if bb is not None:
    s.setdefault('vulnerability', {}).update(black_box_accuracy=bb, n=n)
  return {'rows': rows, 'model_summary': s, 'wall_seconds': 1.0}


def _summary(v, sparsity=0.0, per_feature=None):
  out = {'vulnerability': {'white_box_vulnerability': v, 'black_box_vulnerability': v / 2,
                           'n': 200},
         'sparsity_percent': sparsity, 'memory_percent': 100 - sparsity,
         'flops_speedup': 1 + sparsity / 10}
  if per_feature:
    out['vulnerability']['white_box_per_feature'] = per_feature
  return out


def _features(scale):
  rng = np.random.default_rng(0)
  return [{'site': s, 'vulnerability': list(scale * rng.random(k))}
          for s, k in (('act1', 20), ('act2', 50), ('act3', 500))]


def _synthetic(tmp_path, scale='cpu'):
  runs = frame.plan(reproduce.get_paper('anp'), scale, str(tmp_path))
  # Runs not at this scale (CIFAR-10 at cpu scale) are skipped.
  set_ = lambda name, report: runs.get(name) and setattr(runs.get(name), 'report', report)
  # Validation: the non-paper lam wins (60% vs 55%); the paper's lam would win a tie.
  set_('mnist_standard', _report(0.98, 0.0, summary=_summary(0.3)))
  set_('mnist_at', _report(0.97, 0.70, summary=_summary(0.2)))
  set_('mnist_bp', _report(0.97, 0.0, summary=_summary(0.3, 80.0)))
  set_('mnist_anpvs_0.001', _report(0.96, 0.55, summary=_summary(0.1, 75.0)))
  set_('mnist_anpvs_0.01', _report(0.965, 0.60, summary=_summary(0.1, 78.0)))
  # Test: the selected lam = 0.01 beats AT under PGD-40 (80% vs 60%) but not under the
  # adaptive worst case (50% vs 55%): reproduced only under the paper's attack; it beats
  # Standard under both: reproduced. Less vulnerable than Standard (0.19 vs 0.3: reproduced)
  # and than AT (0.19 vs 0.2: inconclusive); sparse (78%) but 2 points below Standard's
  # clean accuracy: not reproduced.
  set_('mnist_standard_test', _report(0.98, 0.0, 0.0, summary=_summary(0.3, 0.0, _features(
      0.5)), bb=0.6))
  set_('mnist_at_test', _report(0.97, 0.60, 0.55, summary=_summary(0.2, 0.0, _features(0.3))))
  set_('mnist_bp_test', _report(0.97, 0.0, 0.0, summary=_summary(0.3, 80.0), bb=0.6))
  set_('mnist_anpvs_0.001_test', _report(0.96, 0.90, 0.85, summary=_summary(0.05, 75.0),
                                         bb=0.8))
  set_('mnist_anpvs_0.01_test', _report(0.96, 0.80, 0.50, summary=_summary(0.19, 78.0,
                                                                         _features(0.1)),
                                        bb=0.75))
  # CIFAR: ANP-VS is less robust than AT under PGD (not reproduced); against Standard the
  # intervals overlap (inconclusive); more vulnerable than AT (not reproduced).
  set_('cifar_standard', _report(0.5, 0.05, 0.04, summary=_summary(0.08)))
  set_('cifar_at', _report(0.45, 0.30, 0.28, summary=_summary(0.05)))
  set_('cifar_anpvs', _report(0.44, 0.08, 0.06, summary=_summary(0.06, 72.0)))
  # cifar_bp: not finished.
  return runs


def _claims(markdown, heading):
  part = markdown.split(heading, 1)[1].split('###', 1)[0]
  rows = {}
  for line in part.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split(' | ')]
    if len(cells) == 7 and cells[0] != 'claim' and not cells[0].startswith('---'):
      rows[cells[0]] = cells
  return rows


def test_section_from_synthetic_reports_selects_on_validation_and_gives_each_verdict(tmp_path):
  runs = _synthetic(tmp_path)
  gathered = anp.gather(runs)
  chosen, why = anp.select(gathered['validation'], anp.candidates(runs))
  assert chosen == 'anpvs_0.01' and why == 'the highest validation PGD-40 accuracy'
  # Although lam = 0.001 is better on the test split, the test split chooses nothing.
  assert gathered['test']['anpvs_0.001'].pgd.accuracy > gathered['test']['anpvs_0.01'].pgd.accuracy

  section = anp.render(runs, 'results/anp')
  md = section.markdown
  assert '| ANP-VS (λ = 0.01) | 96.5% [95.6, 97.2] | 60.0% [53.1, 66.5] | 78.0 | **selected** |' \
      in md
  assert '| ANP-VS (λ = 0.001) | 96.0% [95.0, 96.8] | 55.0% [48.1, 61.7] | 75.0 | not selected |' \
      in md
  assert '| ANP-VS (λ = 0.01), selected | advdef |' in md
  assert '| ANP-VS (λ = 0.001), not selected on validation | advdef |' in md
  mnist = _claims(md, '### Claims: MNIST')
  lab = 'ANP-VS (λ = 0.01)'
  assert mnist[f'{lab} is more robust than AT under white-box PGD-40'][-1] == frame.PAPER_ONLY
  assert mnist[f'{lab} is more robust than Standard under white-box PGD-40'][-1] == \
      frame.REPRODUCED
  vuln = lambda who: next(v for k, v in mnist.items() if k.startswith(
      f'{lab} is less vulnerable than {who}'))
  assert vuln('Standard')[3] == '0.190 vs Standard 0.300' and vuln('Standard')[-1] == \
      frame.REPRODUCED
  assert vuln('AT')[-1] == frame.INCONCLUSIVE  # 0.19 vs 0.2: within 0.9x..1x
  sparse = next(v for k, v in mnist.items() if 'is sparse' in k)
  assert sparse[-1] == frame.NOT_REPRODUCED  # 78% sparse but 2 points below Standard
  values = [v for k, v in mnist.items() if ' reaches ' in k]
  assert len(values) == 3 and all(v[-1] == frame.NOT_COMPARABLE for v in values)
  # The paper's numbers sit beside advdef's.
  assert '|  | paper | 99.05% | 91.31% | 95.43% |' in md
  assert set(section.figures) == {'vulnerability.png', 'accuracy.png'}
  assert all(png.startswith(b'\x89PNG') for png in section.figures.values())


def test_selection_ties_go_to_the_paper_lam_and_missing_runs_are_not_run(tmp_path):
  runs = _synthetic(tmp_path)
  runs.get('mnist_anpvs_0.01').report = _report(0.96, 0.55)
  chosen, why = anp.select(anp.gather(runs)['validation'], anp.candidates(runs))
  assert chosen == 'anpvs_0.001' and 'tied' in why
  runs.get('mnist_at_test').report = None
  mnist = _claims(anp.render(runs, 'results/anp').markdown, '### Claims: MNIST')
  assert mnist['ANP-VS (λ = 0.001) is more robust than AT under white-box PGD-40'][-1] == \
      frame.NOT_RUN
  assert mnist['AT reaches 88.03% (white-box PGD-40)'][-1] == frame.NOT_RUN


def test_full_scale_value_claims_use_the_value_rule(tmp_path):
  runs = _synthetic(tmp_path, 'full')
  runs.get('mnist_anpvs_0.01_test').report = _report(0.99, 0.9131, 0.90, n=1000)
  mnist = _claims(anp.render(runs, 'results/anp').markdown, '### Claims: MNIST')
  assert mnist['ANP-VS reaches 91.31% (white-box PGD-40)'][-1] == frame.REPRODUCED
  assert mnist['AT reaches 88.03% (white-box PGD-40)'][-1] == frame.NOT_REPRODUCED
  md = anp.render(runs, 'results/anp').markdown
  cifar = _claims(md, '### Claims: CIFAR-10')
  assert cifar['ANP-VS is more robust than AT under white-box PGD-40'][-1] == \
      frame.NOT_REPRODUCED
  assert cifar['ANP-VS is more robust than Standard under white-box PGD-40'][-1] == \
      frame.INCONCLUSIVE
  assert next(v for k, v in cifar.items() if k.startswith(
      'ANP-VS is less vulnerable than AT'))[-1] == frame.NOT_REPRODUCED
  # BP's CIFAR run has not finished.
  assert '| BP | advdef | not finished |' in md and 'Not finished yet: cifar_bp.' in md


# ----------------------------------------------------------------------------------------
# Per-feature vulnerability.


def test_per_feature_vulnerability_matches_a_direct_computation():
  model = models.create_model('lenet5_caffe', num_classes=10, normalize='none')
  x = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
  x_adv = jnp.clip(x + 0.3 * jnp.sign(jax.random.normal(jax.random.key(1), x.shape)), 0, 1)
  variables = model.init(jax.random.key(2), x, train=False)
  names = []
  features = model_summary._feature_fn(model, variables, names)
  _, clean = features(x)
  _, adv = features(x_adv)
  assert names == ['act1', 'act2', 'act3']
  mask = jnp.asarray([True] * 5 + [False])  # the last row is padding
  sums = model_summary.per_unit_distortion_sums(clean, adv, mask)
  for a, b, s in zip(clean, adv, sums):
    a, b = np.asarray(a)[:5], np.asarray(b)[:5]
    direct = np.abs(a - b).reshape(5, -1, a.shape[-1]).mean(axis=1).sum(axis=0)
    np.testing.assert_allclose(np.asarray(s), direct, rtol=1e-5, atol=1e-7)
  # Per unit, divided by the examples and averaged over units and sites: the mean V.
  v = np.mean([np.mean(np.asarray(s) / 5) for s in sums])
  np.testing.assert_allclose(v, float(pruning.vulnerability(
      [f[:5] for f in clean], [f[:5] for f in adv])), rtol=1e-5)
