"""scripts/reproduce.py and advdef.reproduce: the smoke scale end to end for SAP and RSE (runs,
RESULTS.md section between its markers, plots, a rerun that skips the finished runs), --list,
the SAP section rendered from synthetic reports (one constructed case per verdict; RSE's is
in rse_repro_test.py), the verdict rules, the configs of every experiment of every paper, and
SAP's BPDA gradient."""

import base64
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

from advdef import config_utils
from advdef import defenses
from advdef import evaluation
from advdef import experiment
from advdef import reproduce
from advdef.reproduce import frame
from advdef.reproduce import sap

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'reproduce.py'
EPS8 = 8 / 255
# The documented CPU budget of each paper's runs (configs/repro_<paper>.py), in minutes.
CPU_BUDGET_MINUTES = {'sap': 50, 'rse': 60, 'jumprelu': 65, 'anp': 55}  # 'about an hour'


def _script(*args, timeout=300):
  env = conftest.subprocess_env()  # without conftest's 4 virtual devices (sharding tests)
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _section(text, paper):
  begin, end = frame.markers(paper)
  assert text.count(begin) == 1 and text.count(end) == 1, text
  return text[text.index(begin):text.index(end)]


@pytest.mark.slow
def test_smoke_scale_end_to_end_then_a_rerun_skips_every_run(tmp_path):
  results = tmp_path / 'doc' / 'RESULTS.md'
  results.parent.mkdir()
  other = '<!-- paper:rse begin -->\nRSE section, kept as it is\n<!-- paper:rse end -->\n'
  results.write_text('# Reproductions\n\n' + other)
  root = tmp_path / 'runs'
  first = _script('--paper=sap', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert first.returncode == 0, first.stdout + first.stderr
  lines = [l for l in first.stdout.splitlines() if l.startswith('[sap smoke ')]
  assert len(lines) == 2 and all('done in' in l and 'est. left' in l for l in lines), lines
  assert '[sap smoke 1/2] dense' in lines[0] and '[sap smoke 2/2] eval' in lines[1]

  text = results.read_text()
  assert other.strip() in text  # the other paper's section is untouched
  section = _section(text, 'sap')
  assert '### Claims' in section and 'scale `smoke`' in section
  for png in ('accuracy_vs_lambda.png', 'reliability.png'):
    assert (results.parent / 'results' / 'sap' / png).stat().st_size > 1000
    assert f'](results/sap/{png})' in section
  # The BPDA defense's rows reach the SAP-100 adaptive table and its per-example worst case.
  assert '| SAP-100 | BPDA: pgd(steps=2,loss=margin)+eot2 |' in section
  assert 'per example over' in section
  reports = {d: (root / 'sap' / d / 'report.json').stat().st_mtime_ns for d in ('dense', 'eval')}

  again = _script('--paper=sap', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert again.returncode == 0, again.stdout + again.stderr
  lines = [l for l in again.stdout.splitlines() if l.startswith('[sap smoke ')]
  assert len(lines) == 2 and all('skipped, finished' in l for l in lines), lines
  assert {d: (root / 'sap' / d / 'report.json').stat().st_mtime_ns for d in reports} == reports
  assert _section(results.read_text(), 'rse') == _section(text, 'rse')


@pytest.mark.slow
def test_rse_smoke_scale_end_to_end_then_a_rerun_skips_every_run(tmp_path):
  results = tmp_path / 'RESULTS.md'
  other = '<!-- paper:sap begin -->\nSAP section, kept as it is\n<!-- paper:sap end -->\n'
  results.write_text('# Reproductions\n\n' + other)
  root = tmp_path / 'runs'
  first = _script('--paper=rse', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert first.returncode == 0, first.stdout + first.stderr
  lines = [l for l in first.stdout.splitlines() if l.startswith('[rse smoke ')]
  assert len(lines) == 2 and all('done in' in l for l in lines), lines
  assert '[rse smoke 1/2] plain' in lines[0] and '[rse smoke 2/2] eval' in lines[1]

  text = results.read_text()
  assert other.strip() in text
  section = _section(text, 'rse')
  assert '### Claims' in section and 'scale `smoke`' in section
  assert '### C&W L2: accuracy within a distortion tolerance' in section
  assert ('| model | C&W | t = 0.05 | t = 0.1 | t = 0.2 | t = 0.3 | t = 0.5 | t = 0.75 | t = 1 '
          '| t = 1.5 | t = 2 | n |') in section
  assert '| undefended | white-box |' in section
  assert "| noise at inference | one draw per step (the authors' attack) |" in section
  assert ('| noise at inference | per-example worst of every C&W row (1 draw, EOT, transfer) and '
          'of PGD-L2 at t >= its eps |' in section)
  assert (results.parent / 'results' / 'rse' / 'tolerance.png').stat().st_size > 1000
  assert '](results/rse/tolerance.png)' in section
  # The eval run stored the C&W rows' per-example norms beside their correctness.
  report = json.loads((root / 'rse' / 'eval' / 'report.json').read_text())
  cw = {(r['defense'], r['attack'].rsplit(')', 1)[1]): r for r in report['rows']
        if r['attack'].startswith('cw_l2')}
  rse = 'rse(sigma_init=0.2,sigma_inner=0.1)'
  assert {('none', ''), (rse, '+1draw'), (rse, '+eot2')} <= set(cw), list(cw)
  assert all(len(r['tolerance_curve']) == 9 for r in cw.values())
  reports = {d: (root / 'rse' / d / 'report.json').stat().st_mtime_ns for d in ('plain', 'eval')}

  again = _script('--paper=rse', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert again.returncode == 0, again.stdout + again.stderr
  lines = [l for l in again.stdout.splitlines() if l.startswith('[rse smoke ')]
  assert len(lines) == 2 and all('skipped, finished' in l for l in lines), lines
  assert {d: (root / 'rse' / d / 'report.json').stat().st_mtime_ns for d in reports} == reports
  assert _section(results.read_text(), 'rse') == section
  assert _section(results.read_text(), 'sap') == _section(text, 'sap')


def test_list_and_papers_not_built_yet(tmp_path):
  out = _script('--paper=sap', '--scale=cpu', f'--root={tmp_path}', '--list')
  assert out.returncode == 0, out.stderr
  assert 'scale cpu: 12 experiments, estimated' in out.stdout
  for name in ('dense', 'fgsm_sap10', 'fgsm_sap100', 'adaptive_dense', 'adaptive_sap100',
               'bpda_sap100'):
    assert f' {name} ' in out.stdout
  assert f'--config=configs/repro_sap.py:fgsm_sap50,cpu,base={tmp_path}/sap/dense' in out.stdout
  # Every planned paper is built now; a planned one would answer 'not built yet'.
  assert reproduce.PLANNED == () and sorted(reproduce.PAPERS) == ['anp', 'jumprelu', 'rse', 'sap']
  out = _script('--paper=nope', f'--root={tmp_path}')
  assert out.returncode == 2
  assert out.stderr.strip() == ('reproduce: error: --paper=nope: unknown; valid: sap, rse, '
                                'jumprelu, anp')


def test_rse_list(tmp_path):
  out = _script('--paper=rse', '--scale=cpu', f'--root={tmp_path}', '--list')
  assert out.returncode == 0, out.stderr
  head = out.stdout.splitlines()[0]
  assert head.startswith('RSE (Liu et al., ECCV 2018), scale cpu: 9 experiments, estimated ')
  assert float(head.split('estimated ')[1].split(' min')[0]) <= CPU_BUDGET_MINUTES['rse']
  for name in ('plain', 'rse', 'pgd_at', 'l2_plain', 'l2_rse', 'l2_pgd_at', 'linf_plain',
               'linf_rse', 'linf_pgd_at'):
    assert f' {name} ' in out.stdout
  assert f'--config=configs/repro_rse.py:l2_pgd_at,cpu,base={tmp_path}/rse/pgd_at' in out.stdout
  assert f'--config=configs/repro_rse.py:plain,cpu --workdir={tmp_path}/rse/plain' in out.stdout


@pytest.mark.parametrize('scale', frame.SCALES)
@pytest.mark.parametrize('paper', sorted(reproduce.PAPERS))
def test_every_experiment_config_validates(paper, scale, tmp_path, monkeypatch):
  if scale == 'cpu' and not (ROOT.parent / 'shared' / 'data' / 'cifar10_partial.npz').exists():
    pytest.skip('../shared/data is absent')
  monkeypatch.chdir(ROOT)
  runs = frame.plan(reproduce.get_paper(paper), scale, str(tmp_path))
  for run in runs.runs:
    for needs in {r.experiment.needs for r in runs.runs if r.experiment.needs}:
      os.makedirs(frame.workdir(str(tmp_path), runs.paper, needs), exist_ok=True)
    experiment.validate_config(run.config)
    assert run.estimate_s > 0
  if scale == 'cpu':  # the documented budget
    assert sum(r.estimate_s for r in runs.runs) <= CPU_BUDGET_MINUTES[paper] * 60
  if paper == 'rse' and scale == 'smoke':
    assert [r.experiment.name for r in runs.runs] == ['plain', 'eval']


def test_a_finished_run_of_another_config_is_refused(tmp_path):
  runs = frame.plan(reproduce.get_paper('sap'), 'smoke', str(tmp_path))
  run = runs.runs[0]
  os.makedirs(run.workdir)
  config = config_utils.to_dict(run.config)
  config['train']['num_epochs'] = 99
  with open(os.path.join(run.workdir, 'report.json'), 'w') as f:
    json.dump({'config': config, 'rows': []}, f)
  with pytest.raises(ValueError, match='train.num_epochs: 99 != 1'):
    frame.plan(reproduce.get_paper('sap'), 'smoke', str(tmp_path))


def test_sections_of_two_papers_regenerate_independently():
  doc = frame.replace_section('', 'sap', 'SAP one')
  doc = frame.replace_section(doc, 'rse', 'RSE one')
  doc = frame.replace_section(doc, 'sap', 'SAP two')
  assert doc.startswith('# Reproductions')
  assert 'SAP one' not in doc and 'SAP two' in doc and 'RSE one' in doc
  assert doc.index('SAP two') < doc.index('RSE one')


# ----------------------------------------------------------------------------------------
# Verdicts.


def _m(acc, n=100):
  return frame.Measure(acc, tuple(evaluation.wilson_interval(acc * n, n)), n)


def test_verdict_rules():
  assert frame.compare(_m(0.4), _m(0.1)) == 'holds'
  assert frame.compare(_m(0.15), _m(0.1)) == 'unclear'
  assert frame.compare(_m(0.1), _m(0.1)) == 'fails'
  assert frame.compare(None, _m(0.1)) is None
  assert frame.comparative_verdict('holds', 'holds') == frame.REPRODUCED
  assert frame.comparative_verdict('holds', 'unclear') == frame.PAPER_ONLY
  assert frame.comparative_verdict('holds', 'fails') == frame.PAPER_ONLY
  assert frame.comparative_verdict('fails', 'holds') == frame.NOT_REPRODUCED
  assert frame.comparative_verdict('unclear', 'holds') == frame.INCONCLUSIVE
  assert frame.comparative_verdict(None, None) == frame.NOT_RUN
  assert frame.comparative_verdict('holds', None).startswith(frame.REPRODUCED)
  assert frame.value_verdict(0.0, _m(0.0)) == frame.REPRODUCED
  assert frame.value_verdict(0.0, _m(0.02)) == frame.REPRODUCED  # within 2 points
  assert frame.value_verdict(0.0, _m(0.1)) == frame.NOT_REPRODUCED
  assert frame.value_verdict(0.0, None) == frame.NOT_RUN
  assert frame.calibration_verdict([(0.05, 0.04, 100), (0.2, 0.3, 100)]) == frame.REPRODUCED
  assert frame.calibration_verdict([(0.08, 0.04, 100)]) == frame.NOT_REPRODUCED
  assert frame.calibration_verdict([(None, 0.04, 100)]) == frame.NOT_RUN


# ----------------------------------------------------------------------------------------
# The SAP section from synthetic reports.


def _row(defense, attack, eps, acc, n=100, ece=None, **extra):
  row = {'defense': defense, 'attack': attack, 'norm': None if eps is None else 'linf',
         'epsilon': eps, 'accuracy': acc, 'ci95': evaluation.wilson_interval(acc * n, n), 'n': n}
  if ece is not None:
    row['ece'] = ece
  return dict(row, **extra)


def _finish(run, rows, correct=None):
  """Makes `run` finished with these rows; correct: {(defense, attack, eps): robust count},
  stored as per-example results (the first `count` examples robust)."""
  run.report = {'rows': rows, 'wall_seconds': 1.0}
  os.makedirs(os.path.join(run.workdir, 'eval_results'), exist_ok=True)
  for i, ((defense, attack, eps), count) in enumerate((correct or {}).items()):
    row = next(r for r in rows if (r['defense'], r['attack'], r['epsilon']) == (defense, attack,
                                                                                eps))
    arr = np.arange(row['n']) < count
    record = {'value': row, 'arrays': {'correct': {
        'dtype': arr.dtype.str, 'shape': list(arr.shape),
        'base64': base64.b64encode(arr.tobytes()).decode()}}}
    with open(os.path.join(run.workdir, 'eval_results', f'attack_suite-0-{i}-0-x.json'), 'w') as f:
      json.dump(record, f)


def _fgsm_rows(defense, at8, ece_clean, ece8, attack='fgsm'):
  rows = [_row(defense, 'none', None, 0.6, ece=ece_clean,
               calibration_bins={'confidence': [0.5], 'accuracy': [0.6], 'count': [100]})]
  for lam in (1, 2, 4, 8, 16, 32, 64):
    rows.append(_row(defense, attack, lam / 255, at8 if lam == 8 else 0.5 / lam,
                     ece=ece8 if lam == 8 else 0.1))
    if defense != 'none':
      rows.append(_row(defense, 'fgsm+transfer(none)', lam / 255, 0.5))
  return rows


# (FGSM accuracy at lambda 8, adaptive worst case, clean ECE, ECE at lambda 8, expected
# robustness verdict, expected calibration verdict), per model; the dense model: 10%, 0%.
CASES = {
    10: (0.40, 0.30, 0.05, 0.20, frame.REPRODUCED, frame.REPRODUCED),
    20: (0.40, 0.02, 0.20, 0.20, frame.PAPER_ONLY, frame.NOT_REPRODUCED),
    50: (0.08, 0.00, 0.05, 0.20, frame.NOT_REPRODUCED, frame.REPRODUCED),
    100: (0.15, 0.00, 0.05, 0.20, frame.INCONCLUSIVE, frame.REPRODUCED),
}


def _synthetic_runs(tmp_path):
  runs = frame.plan(reproduce.get_paper('sap'), 'cpu', str(tmp_path))
  _finish(runs.get('dense'), [_row('none', 'none', None, 0.62, n=846, ece=0.04)])
  _finish(runs.get('fgsm_dense'), _fgsm_rows('none', 0.10, 0.04, 0.30),
          {('none', 'fgsm', EPS8): 10})
  _finish(runs.get('adaptive_dense'), [_row('none', 'pgd(steps=20,loss=margin,restarts=2)',
                                            EPS8, 0.0)],
          {('none', 'pgd(steps=20,loss=margin,restarts=2)', EPS8): 0})
  for k, (at8, worst, ece_clean, ece8, _, _) in CASES.items():
    spec = f'sap(frac={k / 100})'
    _finish(runs.get(f'fgsm_sap{k}'), _fgsm_rows(spec, at8, ece_clean, ece8, 'fgsm+eot8'),
            {(spec, 'fgsm+eot8', EPS8): round(100 * at8),
             (spec, 'fgsm+transfer(none)', EPS8): 50})
    pgd = 'pgd(steps=10,loss=margin)+eot8'
    pgd_acc = worst if k != 20 else 0.35  # SAP-20's worst case: its BPDA run
    _finish(runs.get(f'adaptive_sap{k}'), [_row(spec, pgd, EPS8, pgd_acc)],
            {(spec, pgd, EPS8): round(100 * pgd_acc)})
  # SAP-20's worst case comes from the BPDA run (as SAP-100's BPDA row, but on SAP-20 here).
  bpda = runs.get('bpda_sap100')
  _finish(bpda, [_row('sap(frac=1.0,gradient=identity)', 'pgd(steps=10,loss=margin)+eot8',
                      EPS8, 0.01)],
          {('sap(frac=1.0,gradient=identity)', 'pgd(steps=10,loss=margin)+eot8', EPS8): 1})
  extra = frame.Run(frame.Experiment('bpda_sap20', 'adaptive', 'dense', 'dense',
                                     ('sap(frac=0.2,gradient=identity)',), ('pgd',), 'BPDA'),
                    str(tmp_path / 'sap' / 'bpda_sap20'), '', bpda.config, 1.0)
  _finish(extra, [_row('sap(frac=0.2,gradient=identity)', 'pgd+eot8', EPS8, 0.02)],
          {('sap(frac=0.2,gradient=identity)', 'pgd+eot8', EPS8): 2})
  runs.runs.append(extra)
  return runs


def _claim_rows(markdown):
  rows = {}
  for line in markdown.splitlines():
    cells = [c.strip() for c in line.strip('|').split(' | ')]
    if len(cells) == 7 and cells[0] != 'claim' and not cells[0].startswith('---'):
      rows[cells[0]] = cells
  return rows


def test_sap_section_from_synthetic_reports_gives_each_verdict(tmp_path):
  runs = _synthetic_runs(tmp_path)
  models = sap.gather(runs)
  assert list(models) == ['dense', 'SAP-10', 'SAP-20', 'SAP-50', 'SAP-100']
  # The worst case is per example across runs: FGSM (40 robust), its transfer (50) and
  # EOT-PGD (30) on SAP-10 leave the first 30 examples.
  worst, how = models['SAP-10'].worst()
  assert (worst.accuracy, worst.n, how) == (0.30, 100, 'per example over 3 attacks')
  worst, how = models['SAP-20'].worst()  # the BPDA run's two examples
  assert (worst.accuracy, how) == (0.02, 'per example over 4 attacks')

  section = sap.render(runs, 'results/sap')
  claims = _claim_rows(section.markdown)
  for k, (_, _, _, _, robust, calibration) in CASES.items():
    row = claims[f'SAP-{k} is more accurate than the dense model under attack (λ = 8)']
    assert row[-1] == robust, (k, row)
    assert claims[f'SAP-{k} preserves calibration'][-1] == calibration, k
  assert claims['SAP-10 is more accurate than the dense model under attack (λ = 8)'][3] == \
      '40.0% [30.9, 49.8] vs dense 10.0% [5.5, 17.4]'
  athalye = next(v for c, v in claims.items() if c.startswith('SAP is broken at 8/255'))
  assert athalye[4] == '0.0% [0.0, 3.7]' and athalye[-1] == frame.REPRODUCED
  bpda = next(v for c, v in claims.items() if c.startswith('BPDA through SAP'))
  assert bpda[4] == '(BPDA, SAP-100) 1.0% [0.2, 5.4]' and bpda[-1] == frame.REPRODUCED
  clean = next(v for c, v in claims.items() if c.startswith('Dense ResNet-20 clean'))
  assert clean[-1] == frame.NOT_COMPARABLE and clean[5] == '846'
  adv = next(v for c, v in claims.items() if c.startswith('The ADV model'))
  assert adv[-1] == frame.NOT_RUN
  assert '| SAP-100 | BPDA: pgd(steps=10,loss=margin)+eot8 |' in section.markdown
  assert 'Data: `npz:cifar10_partial`, 4,660 training / 846 test images' in section.markdown
  assert set(section.figures) == {'accuracy_vs_lambda.png', 'reliability.png'}
  assert all(png.startswith(b'\x89PNG') for png in section.figures.values())


def test_worst_case_without_per_example_results_is_an_upper_bound(tmp_path):
  runs = _synthetic_runs(tmp_path)
  for path in (tmp_path / 'sap' / 'adaptive_sap50' / 'eval_results').iterdir():
    path.unlink()
  worst, how = sap.gather(runs)['SAP-50'].worst()
  assert worst.accuracy == 0.0 and 'upper bound' in how


# ----------------------------------------------------------------------------------------
# SAP's BPDA gradient (defenses.sap(..., gradient='identity')).


def test_sap_identity_gradient_is_sap_forward_and_identity_backward():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 4, 4, 2)))
  key = jax.random.key(1)
  constant = lambda x: defenses.sap(key, x, frac=0.5)
  identity = lambda x: defenses.sap(key, x, frac=0.5, gradient='identity')
  w = jax.random.normal(jax.random.key(2), x.shape)
  both = jax.jit(lambda x: (constant(x), jax.value_and_grad(
      lambda x: jnp.sum(w * identity(x)))(x), identity(x)))
  value, (total, grad), out = both(x)
  np.testing.assert_array_equal(out, value)  # the same forward values, bit for bit
  assert np.sum(out > 0) < np.sum(x > 0)  # (SAP pruned some units)
  np.testing.assert_array_equal(grad, w)  # the identity backward pass
  np.testing.assert_allclose(total, jnp.sum(w * value), rtol=1e-6)
