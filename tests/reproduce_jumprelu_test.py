"""The JumpReLU reproduction (configs/repro_jumprelu.py, advdef.reproduce.jumprelu): the smoke
scale end to end through scripts/reproduce.py, and the section's rules on constructed runs:
kappa* chosen on the validation split, the paper's gray-box / white-box protocols and the
adaptive worst case per example, the Rel. Noise claim and the robust-gains-more claim."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import conftest

from advdef import reproduce
from advdef.reproduce import frame
from advdef.reproduce import jumprelu

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'reproduce.py'


def _script(*args, timeout=600):
  env = conftest.subprocess_env()
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _section(text):
  begin, end = frame.markers('jumprelu')
  assert text.count(begin) == 1 and text.count(end) == 1, text
  return text[text.index(begin):text.index(end)]


@pytest.mark.slow
def test_smoke_scale_end_to_end_then_a_rerun_skips_every_run(tmp_path):
  results, root = tmp_path / 'RESULTS.md', tmp_path / 'runs'
  first = _script('--paper=jumprelu', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert first.returncode == 0, first.stdout + first.stderr
  lines = [l for l in first.stdout.splitlines() if l.startswith('[jumprelu smoke ')]
  assert len(lines) == 2 and all('done in' in l for l in lines), lines
  assert '1/2] lenet' in lines[0] and '2/2] eval_lenet' in lines[1]
  section = _section(results.read_text())
  assert '### Claims' in section and 'scale `smoke`' in section
  assert '| kappa | threat | clean (validation) | clean (test) | IFGSM (ρ) |' in section
  assert (results.parent / 'results' / 'jumprelu' / 'kappa_mnist.png').stat().st_size > 1000

  # The training run evaluated on the validation split, the eval run on the test split.
  train = json.loads((root / 'jumprelu' / 'lenet' / 'report.json').read_text())
  evaluated = json.loads((root / 'jumprelu' / 'eval_lenet' / 'report.json').read_text())
  assert train['dataset'].endswith('(validation split)')
  assert not evaluated['dataset'].endswith('(validation split)')
  rows = {r['attack'] for r in evaluated['rows'] if r['defense'] == 'jump(kappa=0.5)'}
  for family in ('ifgsm_min', 'deepfool(norm=linf', 'deepfool(norm=l2', 'trust_region', 'pgd'):
    labels = {a for a in rows if a.startswith(family)}
    # White-box, BPDA and gray-box for every gradient attack (eval.transfer_attacks='all').
    assert len(labels) == 3 and any(a.endswith('+bpda') for a in labels), labels
    assert any(a.endswith('+transfer(kappa=0)') for a in labels), labels
  minimum = [r for r in evaluated['rows'] if r['attack'].startswith('deepfool')]
  assert minimum and all(r['paper_relative_noise'] >= 0 for r in minimum)
  assert {r['norm'] for r in minimum} == {'l2', 'linf'}

  again = _script('--paper=jumprelu', '--scale=smoke', f'--root={root}', f'--results={results}')
  assert again.returncode == 0, again.stdout + again.stderr
  lines = [l for l in again.stdout.splitlines() if l.startswith('[jumprelu smoke ')]
  assert len(lines) == 2 and all('skipped, finished' in l for l in lines), lines
  assert _section(results.read_text()) == section


# ----------------------------------------------------------------------------------------
# The rules, on constructed models.


def _row(acc, n=10, **fields):
  return dict(accuracy=acc, ci95=[max(0.0, acc - 0.1), min(1.0, acc + 0.1)], n=n, **fields)


def _attacked(correct, rho=None):
  correct = np.asarray(correct, bool)
  fields = {} if rho is None else {'paper_relative_noise': rho}
  return jumprelu.Attacked(_row(float(correct.mean()), len(correct), **fields), correct)


def _model(name, validation, grids):
  """grids: kappa -> {(family, threat): correct list}."""
  m = jumprelu.Model(name, validation={k: _row(a) for k, a in validation.items()})
  for k, cells in grids.items():
    m.attacked[k] = {key: _attacked(c, rho) for key, (c, rho) in cells.items()}
  return m


def test_kappa_star_is_the_largest_kappa_within_the_validation_accuracy_drop():
  m = _model('lenet', {0.0: 0.98, 0.5: 0.975, 1.0: 0.961, 1.5: 0.90}, {})
  assert jumprelu.choose_kappa(m, 0.02) == 1.0
  assert jumprelu.choose_kappa(m, 0.005) == 0.5
  assert jumprelu.choose_kappa(m, 0.001) == 0.0
  assert jumprelu.choose_kappa(jumprelu.Model('x'), 0.02) is None
  # Non-monotone accuracies: a larger kappa that is within the drop still wins.
  m = _model('lenet', {0.0: 0.98, 0.5: 0.95, 1.0: 0.97}, {})
  assert jumprelu.choose_kappa(m, 0.02) == 1.0


def _cells(white, gray=None, bpda=None, pgd=None):
  out = {}
  for f, c in zip(jumprelu.PAPER_FAMILIES, white):
    out[(f, 'white-box')] = (c, 0.1)
  for f, c in zip(jumprelu.PAPER_FAMILIES, gray or ()):
    out[(f, 'gray-box')] = (c, 0.2)
  for f, c in zip(jumprelu.PAPER_FAMILIES, bpda or ()):
    out[(f, 'BPDA')] = (c, 0.05)
  if pgd is not None:
    out[('PGD', 'white-box')] = (pgd, None)
  return out


def test_protocols_are_per_example_worst_cases_over_their_rows():
  ones, zeros = [1, 1, 1, 1], [0, 0, 0, 0]
  m = _model('lenet', {}, {
      0.0: _cells([[1, 1, 0, 0], [1, 0, 1, 0], ones, ones], pgd=[1, 1, 1, 0]),
      1.0: _cells(white=[ones, ones, ones, [1, 1, 1, 0]], gray=[[1, 1, 0, 1], ones, ones, ones],
                  bpda=[[0, 1, 1, 1], ones, ones, ones], pgd=ones)})
  # kappa = 0: the gray-box protocol is the white-box attack on the same model.
  assert m.correct(0.0, 'gray-box').tolist() == [True, False, False, False]
  assert m.correct(0.0, 'white-box').tolist() == [True, False, False, False]
  assert m.correct(0.0, 'adaptive').tolist() == [True, False, False, False]
  assert m.correct(1.0, 'white-box').tolist() == [True, True, True, False]
  assert m.correct(1.0, 'gray-box').tolist() == [True, True, False, True]
  # Adaptive: every row (white-box, BPDA, gray-box, PGD).
  assert m.correct(1.0, 'adaptive').tolist() == [False, True, False, False]
  # A missing paper attack or per-example result: no protocol figure, not a partial one.
  m.attacked[1.0].pop(('TR', 'gray-box'))
  assert m.correct(1.0, 'gray-box') is None
  m.attacked[1.0][('TR', 'white-box')].correct = None
  assert m.correct(1.0, 'white-box') is None


def test_claims_give_each_verdict():
  n = 40
  good, bad = [True] * n, [False] * n
  half = [i % 2 == 0 for i in range(n)]
  standard = _model('lenet', {0.0: 0.98, 1.0: 0.97}, {
      0.0: _cells([half] * 4, pgd=half),
      # Robust to the paper's attacks at kappa*, broken by BPDA: reproduced only under them.
      1.0: _cells(white=[good] * 4, gray=[good] * 4, bpda=[bad] * 4, pgd=half)})
  robust = _model('lenet_robust', {0.0: 0.97, 1.0: 0.96}, {
      0.0: _cells([bad] * 4, pgd=bad),
      1.0: _cells(white=[good] * 4, gray=[good] * 4, bpda=[good] * 4, pgd=good)})
  for k, rho in ((0.0, 0.1), (1.0, 0.3)):
    for f in jumprelu.PAPER_FAMILIES:
      robust.attacked[k][(f, 'white-box')].row['paper_relative_noise'] = rho
  # The standard model's Rel. Noise shrinks for one attack at kappa*.
  standard.attacked[1.0][('TR', 'white-box')].row['paper_relative_noise'] = 0.01
  models = {'lenet': standard, 'lenet_robust': robust}
  chosen = {name: jumprelu.choose_kappa(m, 0.02) for name, m in models.items()}
  assert chosen == {'lenet': 1.0, 'lenet_robust': 1.0}
  rows = {r[0]: r[-1] for r in jumprelu.claims(models, chosen, 'cpu')}
  title = jumprelu.TITLES
  assert rows[f"{title['lenet']}: JumpReLU at kappa* = 1 is more accurate than kappa = 0 under "
              "the paper's gray-box attacks"] == frame.PAPER_ONLY
  assert rows[f"{title['lenet_robust']}: JumpReLU at kappa* = 1 is more accurate than kappa = 0 "
              "under the paper's white-box attacks"] == frame.REPRODUCED
  noise = [r for r in jumprelu.claims(models, chosen, 'cpu') if 'Rel. Noise' in r[0]]
  # Standard: its paper attacks fool only half at kappa = 0, so no rho is a minimum.
  assert noise[0][0].startswith(title['lenet']) and noise[0][-1] == frame.NOT_RUN
  # Robust: 0.1 -> 0.3 white-box (3x), but BPDA's 0.05 is smaller than kappa = 0's.
  assert noise[1][-1] == frame.PAPER_ONLY
  assert noise[1][3].startswith('IFGSM 0.1 → 0.3 (3.00×)')
  assert noise[1][4].startswith('IFGSM 0.1 → 0.05 (0.50×)')
  for f in jumprelu.PAPER_FAMILIES:
    robust.attacked[1.0][(f, 'BPDA')].row['paper_relative_noise'] = 0.12
  assert jumprelu.noise_claim(robust, 1.0)[2] == frame.REPRODUCED
  robust.attacked[1.0][('TR', 'BPDA')].row['paper_relative_noise'] = 0.109
  assert jumprelu.noise_claim(robust, 1.0)[2] == frame.PAPER_ONLY   # TR: 1.09x < 1.1x
  pgd = {r[0].split(':')[0]: r[-1] for r in jumprelu.claims(models, chosen, 'cpu')
         if 'under PGD-20' in r[0]}
  # Standard: PGD half -> half: fails; robust: 0% -> 100% under every PGD row.
  assert pgd == {title['lenet']: frame.NOT_REPRODUCED, title['lenet_robust']: frame.REPRODUCED}
  gains = [r for r in jumprelu.claims(models, chosen, 'cpu') if r[0].startswith('MNIST')][0]
  # Robust gains 100 points (0 -> 100%), standard 50 (paper) and -50 (adaptive).
  assert gains[3].startswith('+50.0 points') and gains[4].startswith('+150.0 points')
  assert gains[-1] == frame.REPRODUCED
  cifar = [r for r in jumprelu.claims(models, chosen, 'cpu') if r[0].startswith('CIFAR')][0]
  assert cifar[-1] == frame.NOT_RUN


def test_the_gain_interval_is_a_paired_bootstrap_and_the_verdict_reads_it():
  rng = np.random.default_rng(1)
  base = rng.random(200) < 0.5
  same = (base, base.copy())
  value, ci = jumprelu._gain_interval(same, same)
  assert value == 0 and ci == (0.0, 0.0)
  assert jumprelu._difference_verdict(value, ci) == 'fails'
  better = (base, np.ones(200, bool))
  value, ci = jumprelu._gain_interval(better, same)
  assert value == pytest.approx(1 - base.mean()) and ci[0] > 0.4
  assert jumprelu._difference_verdict(value, ci) == 'holds'
  # A small positive difference whose interval straddles 0.
  flip = base.copy()
  flip[np.flatnonzero(~base)[:2]] = True
  value, ci = jumprelu._gain_interval((base, flip), same)
  assert value > 0 and ci[0] <= 0 and jumprelu._difference_verdict(value, ci) == 'unclear'


def test_labels_map_to_families_threats_and_kappas():
  assert jumprelu.family_of('deepfool(norm=l2,steps=7)+bpda') == 'DeepFool-2'
  assert jumprelu.family_of('deepfool(norm=linf,steps=7)') == 'DeepFool-inf'
  assert jumprelu.family_of('trust_region(norm=l2)+transfer(kappa=0)') == 'TR'
  assert jumprelu.family_of('ifgsm_min(steps=40)') == 'IFGSM'
  assert jumprelu.family_of('square(queries=10)') is None
  assert jumprelu.threat_of('pgd(steps=20)+transfer(kappa=0)') == 'gray-box'
  assert jumprelu.threat_of('pgd(steps=20)+bpda') == 'BPDA'
  assert jumprelu.threat_of('pgd(steps=20)') == 'white-box'
  assert jumprelu.kappa_of('none') == 0.0 and jumprelu.kappa_of('jump(kappa=0.5)') == 0.5
  assert jumprelu.kappa_of("jump(kappa=0.5, surrogate='relu')") is None
  assert jumprelu.kappa_of('sap(frac=1.0)') is None


def test_cpu_configs_choose_nothing_on_test_images():
  module = frame.config_module(reproduce.get_paper('jumprelu'))
  for e in module.experiments('cpu'):
    arg = f'{e["name"]},cpu' + (',base=/tmp/x' if e['needs'] else '')
    c = module.get_config(arg)
    assert c.data.validation_fraction == module.VALIDATION_FRACTION
    assert c.data.eval_split == ('validation' if e['kind'] == 'train' else 'test')
  # The attack sizes are the authors' normalised 0.01, in pixels.
  attacks = module.paper_attacks('mnist', 'cpu')
  assert attacks[0] == 'ifgsm_min(step_size=0.003081, steps=40)'
  assert 'radius=0.003081' in attacks[3] and 'steps=40' in attacks[3]
  assert module.paper_attacks('cifar', 'cpu')[1] == 'deepfool(norm=linf, steps=7, overshoot=0.02)'
