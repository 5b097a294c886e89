"""Tests for advdef.reporting and advdef.plots: schema validation, atomic writes, Markdown
tables and plots."""

import copy
import json
import math
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import advdef
from advdef.files import write_json_atomic
from advdef import plots
from advdef.reporting import format_table, new_report, validate_report, write_report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _clean_row(defense, accuracy, ci, **extra):
  return {'defense': defense, 'attack': 'none', 'norm': None, 'epsilon': None,
          'accuracy': accuracy, 'ci95': ci, 'n': 1000, **extra}


def _bins(shift):
  conf = [0.05 + 0.1 * i for i in range(10)]
  return {'confidence': conf, 'accuracy': [min(1.0, c + shift) for c in conf],
          'count': [0, 3, 5, 10, 20, 40, 80, 120, 240, 482]}


def _realistic_report():
  config = ml_collections.ConfigDict({'model': {'name': 'lenet_like'}, 'seed': 0,
                                      'eval': {'epsilons': (0.1, 0.2, 0.3)}})
  report = new_report(config=config, dataset='npz:mnist10k', model='lenet_like',
                      training={'steps': 2000, 'wall_seconds': 95.5,
                                'final': {'train_accuracy': 0.9921, 'test_accuracy': 0.9876}})
  report['created'] = '2025-01-02T03:04:05+00:00'  # Fixed so the Markdown is predictable.
  rows = [
      _clean_row('baseline', 0.9876, [0.9795, 0.9925], nll=0.04125, ece=0.00512, brier=0.01934,
                 calibration_bins=_bins(0.0), seconds=1.25),
      _clean_row('sap', 0.9712, [0.9598, 0.9796], nll=float('nan'), ece=0.0123, brier=0.0456,
                 per_draw_accuracy=0.9655, per_draw_ci95=[0.9532, 0.9748], num_draws=10,
                 calibration_bins=_bins(-0.05)),
  ]
  for defense, attack, accs in (('baseline', 'pgd', (0.72, 0.21, 0.013)),
                                ('sap', 'eot_pgd', (0.65, 0.18, 0.0))):
    for eps, acc in zip((0.1, 0.2, 0.3), accs):
      row = {'defense': defense, 'attack': attack, 'norm': 'linf', 'epsilon': eps,
             'accuracy': acc, 'ci95': [max(0.0, acc - 0.03), min(1.0, acc + 0.03)], 'n': 1000,
             'nll': 1.5 + eps, 'seconds': 12.0}
      if defense == 'sap':
        row.update(per_draw_accuracy=acc + 0.02, num_draws=10)
      rows.append(row)
  rows.append({'defense': 'baseline', 'attack': 'ddn', 'norm': 'l2', 'epsilon': 1.5,
               'accuracy': 0.412, 'ci95': [0.3815, 0.4431], 'n': 1000,
               'median_perturbation': 1.3456, 'median_relative_perturbation': 0.1234})
  rows.append({'defense': 'baseline', 'attack': 'worst_case', 'norm': 'linf', 'epsilon': 0.3,
               'accuracy': 0.009, 'ci95': [0.0041, 0.0171], 'n': 1000, 'worst_case': True,
               'attacks': ['pgd', 'fab', 'square']})
  report['rows'] = rows
  report['checks'] = [
      {'defense': 'sap', 'name': 'gradient_obfuscation', 'status': 'fail',
       'detail': 'transfer attack beats white-box | 0.12 vs 0.18'},
      {'defense': 'sap', 'name': 'eps_monotone', 'status': 'pass', 'detail': 'accuracy falls with epsilon'},
      {'defense': 'baseline', 'name': 'unbounded_attack', 'status': 'warn',
       'detail': 'accuracy at eps=1 is 0.4%'},
  ]
  report['sweeps'] = [{'defense': 'sap', 'param': 'keep_fraction', 'values': [0.25, 0.5, 1.0],
                       'clean_accuracy': [0.95, 0.97, 0.9876], 'robust_accuracy': [0.25, 0.18, None],
                       'attack': 'eot_pgd', 'epsilon': 0.2}]
  report['notes'] = ['SAP is stochastic; accuracy counts an example correct only if all draws are.']
  return report


def _nan_to_none(obj):
  if isinstance(obj, float) and math.isnan(obj):
    return None
  if isinstance(obj, dict):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  return obj


def test_write_report_json_roundtrip(tmp_path):
  report = _realistic_report()
  paths = write_report(tmp_path, report)
  assert paths[-1] == tmp_path / 'report.json'
  assert {p.name for p in paths} == {'report.json', 'report.md', 'accuracy_vs_epsilon.png',
                                     'reliability.png', 'sweep_sap_keep_fraction.png'}
  loaded = json.loads((tmp_path / 'report.json').read_text())
  expected = _nan_to_none(report)
  expected['config'] = {'model': {'name': 'lenet_like'}, 'seed': 0,
                        'eval': {'epsilons': [0.1, 0.2, 0.3]}}
  assert loaded == expected
  assert loaded['rows'][1]['nll'] is None
  assert loaded['advdef_version'] == advdef.__version__


def test_report_markdown_tables(tmp_path):
  write_report(tmp_path, _realistic_report())
  md = (tmp_path / 'report.md').read_text()
  lines = md.splitlines()
  assert lines[0] == '# advdef report: lenet_like on npz:mnist10k'
  expected_lines = [
      # Training, flattened.
      '| final.test_accuracy | 0.9876 |',
      # Clean accuracy with per-draw and calibration columns; NaN NLL shows as a dash.
      '| defense | accuracy | 95% CI | n | per-draw acc. | per-draw 95% CI | draws | NLL | ECE | Brier | seconds |',
      '| baseline | 98.76% | [97.95, 99.25] | 1000 | — | — | — | 0.0413 | 0.0051 | 0.0193 | 1.2 |',
      '| sap | 97.12% | [95.98, 97.96] | 1000 | 96.55% | [95.32, 97.48] | 10 | — | 0.0123 | 0.0456 | — |',
      # Robustness per defense x attack x epsilon, sorted.
      '| defense | attack | norm | ε | accuracy | 95% CI | n | per-draw acc. | draws | median pert. | median rel. pert. | NLL | seconds |',
      '| baseline | ddn | l2 | 1.5 | 41.20% | [38.15, 44.31] | 1000 | — | — | 1.346 | 0.1234 | — | — |',
      '| baseline | pgd | linf | 0.1 | 72.00% | [69.00, 75.00] | 1000 | — | — | — | — | 1.6000 | 12.0 |',
      '| baseline | pgd | linf | 0.3 | 1.30% | [0.00, 4.30] | 1000 | — | — | — | — | 1.8000 | 12.0 |',
      '| sap | eot_pgd | linf | 0.2 | 18.00% | [15.00, 21.00] | 1000 | 20.00% | 10 | — | — | 1.7000 | 12.0 |',
      # Worst case.
      '| defense | norm | ε | accuracy | 95% CI | n | attacks |',
      '| baseline | linf | 0.3 | 0.90% | [0.41, 1.71] | 1000 | pgd, fab, square |',
      # Checks, failures first, with the pipe in the detail escaped.
      '1 pass, 1 warn, 1 fail.',
      r'| sap | gradient_obfuscation | **FAIL** | transfer attack beats white-box \| 0.12 vs 0.18 |',
      '| baseline | unbounded_attack | **warn** | accuracy at eps=1 is 0.4% |',
      '| sap | eps_monotone | pass | accuracy falls with epsilon |',
      # Sweep.
      '### sap: keep_fraction (robust against eot_pgd at ε = 0.2)',
      '| keep_fraction | clean accuracy | robust accuracy |',
      '| 0.25 | 95.00% | 25.00% |',
      '| 1 | 98.76% | — |',
      '- SAP is stochastic; accuracy counts an example correct only if all draws are.',
  ]
  for line in expected_lines:
    assert line in lines, f'missing line: {line}\n\n{md}'
  # The FAIL row precedes the warn row, which precedes the pass row.
  order = [i for i, l in enumerate(lines) if l.startswith(('| sap | gradient', '| baseline | unbounded',
                                                           '| sap | eps_monotone'))]
  assert order == sorted(order) and len(order) == 3
  for heading in ('## Training', '## Clean accuracy', '## Robustness', '## Worst case over attacks',
                  '## Checks', '## Sweeps', '## Notes'):
    assert heading in lines


def test_report_plots_are_png(tmp_path):
  write_report(tmp_path, _realistic_report())
  for name in ('accuracy_vs_epsilon.png', 'reliability.png', 'sweep_sap_keep_fraction.png'):
    data = (tmp_path / name).read_bytes()
    assert data[:8] == PNG_MAGIC, name
    assert len(data) > 1024, name


def test_minimal_report_writes_only_applicable_plots(tmp_path):
  report = new_report(config={'seed': 1}, dataset='cifar10', model='resnet20')
  report['rows'] = [_clean_row('baseline', 0.9, None)]
  paths = write_report(tmp_path, report)
  assert [p.name for p in paths] == ['report.md', 'report.json']
  md = (tmp_path / 'report.md').read_text()
  assert '| baseline | 90.00% | — | 1000 |' in md
  assert '## Robustness' not in md


@pytest.mark.parametrize('mutate, message', [
    (lambda r: r['rows'][0].update(accuracy=1.5), r"'accuracy' must be a number in \[0, 1\], got 1.5"),
    (lambda r: r['rows'][2].pop('n'), r"missing required key\(s\) \['n'\]"),
    (lambda r: r['checks'][0].update(status='ok'), r"'status' must be one of \['pass', 'warn', 'fail'\]"),
    (lambda r: r['rows'][0].update(norm='l1'), "'norm' must be one of"),
    (lambda r: r['rows'][0].update(acuracy=0.5), r"unknown key\(s\) \['acuracy'\]"),
    (lambda r: r['rows'][-1].pop('attacks'), "worst-case row needs 'attacks'"),
    (lambda r: r['rows'][0].update(accuracy=float('nan')), r'got None \(NaN or inf\)'),
    (lambda r: r['sweeps'][0].update(values=[1, 2]), "'clean_accuracy' has 3 entries"),
    (lambda r: r.pop('model'), r"missing top-level key\(s\) \['model'\]"),
])
def test_invalid_report_raises_and_leaves_previous_files_untouched(tmp_path, mutate, message):
  write_report(tmp_path, _realistic_report())
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  bad = copy.deepcopy(_realistic_report())
  mutate(bad)
  with pytest.raises(ValueError, match=message):
    write_report(tmp_path, bad)
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  assert after == before  # Byte-identical, and no temporary files left.


def test_validation_reports_every_problem_at_once():
  report = _realistic_report()
  report['rows'][0]['accuracy'] = 1.5
  del report['rows'][2]['n']
  report['checks'][0]['status'] = 'bad'
  with pytest.raises(ValueError) as excinfo:
    validate_report(report)
  message = str(excinfo.value)
  assert message.startswith('invalid report (nothing was written):')
  assert "rows[0] (defense 'baseline', attack 'none', epsilon None)" in message
  assert message.count('\n  - ') == 3


def test_numpy_and_jax_values_are_accepted():
  report = _realistic_report()
  report['rows'][0].update(accuracy=np.float32(0.5), n=np.int64(1000), ci95=jnp.array([0.4, 0.6]))
  validate_report(report)


def test_write_json_atomic_converts_and_leaves_no_temp_files(tmp_path):
  obj = {'a': np.float32(1.5), 'b': jnp.arange(3), 'c': (1, float('nan'), float('inf')),
         'd': np.bool_(True), 'e': {'f': jnp.float32(2.0)}, 'g': np.array([[1.0, np.nan]])}
  path = write_json_atomic(tmp_path / 'sub' / 'x.json', obj)
  text = path.read_text()
  assert json.loads(text) == {'a': 1.5, 'b': [0, 1, 2], 'c': [1, None, None], 'd': True,
                              'e': {'f': 2.0}, 'g': [[1.0, None]]}
  assert 'NaN' not in text and 'Infinity' not in text
  write_json_atomic(path, {'x': 1})  # Overwrite in place.
  assert json.loads(path.read_text()) == {'x': 1}
  assert os.listdir(path.parent) == ['x.json']
  # A value with no JSON form fails before anything is written, naming where it is.
  with pytest.raises(TypeError, match=r'e\.f'):
    write_json_atomic(path, {'e': {'f': object()}})
  assert json.loads(path.read_text()) == {'x': 1}
  assert os.listdir(path.parent) == ['x.json']


def test_format_table():
  table = format_table([['a', 1, 0.123456, None], {'name': 'b|c', 'count': 2}],
                       ['name', 'count', 'value', 'note'])
  assert table == ('| name | count | value | note |\n'
                   '|---|---|---|---|\n'
                   '| a | 1 | 0.1235 | — |\n'
                   r'| b\|c | 2 | — | — |' + '\n')
  with pytest.raises(ValueError, match='2 cells but there are 3 columns'):
    format_table([[1, 2]], ['a', 'b', 'c'])


def test_training_curves(tmp_path):
  rows = [{'step': s, 'time': float(s), 'train/loss': 2.0 / s, 'train/accuracy': 1 - 1.0 / (s + 1),
           'test/accuracy': None if s % 2 else 0.5 + s / 40} for s in range(1, 21)]
  path = plots.training_curves(rows, tmp_path / 'curves.png')
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 1024
  with pytest.raises(ValueError, match="no loss or accuracy"):
    plots.training_curves([{'step': 1, 'lr': 0.1}], tmp_path / 'none.png')


def test_plots_skip_what_cannot_be_drawn():
  clean = [_clean_row('baseline', 0.9, None)]
  no_epsilon = {**_clean_row('baseline', 0.5, None), 'attack': 'pgd'}
  assert plots.accuracy_vs_epsilon(clean, []) is None
  assert plots.accuracy_vs_epsilon(clean, [no_epsilon]) is None
  assert plots.reliability(clean) is None
  png = plots.accuracy_vs_epsilon(clean, [{**no_epsilon, 'norm': 'linf', 'epsilon': 0.1}])
  assert png[:8] == PNG_MAGIC


def test_per_draw_accuracy_nan_is_named():
  report = _realistic_report()
  report['rows'][1]['per_draw_accuracy'] = float('nan')
  with pytest.raises(ValueError, match=r"'per_draw_accuracy' must be .*got None \(NaN or inf\)"):
    validate_report(report)
