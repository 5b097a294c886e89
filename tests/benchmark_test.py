"""scripts/benchmark.py at its smoke-test size: every section present, with numeric ratios.

CI does not run the benchmark itself; this runs `--tiny --skip-peers` (ResNet-2, batch 2, one
repeat, no PyTorch / foolbox install) in a subprocess and checks the JSON's structure. Parts of
the benchmark (the host SAP reference, the sweep timing of scripts/sweep_timing.py) are tested
directly.
"""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'benchmark.py'
sys.path.insert(0, str(REPO / 'scripts'))  # scripts/ is not a package.

import benchmark  # noqa: E402
import sweep_timing  # noqa: E402

SECTIONS = ('pgd/resnet20', 'pgd/lenet_like', 'train/resnet20', 'train/lenet_like', 'sap',
            'eot', 'sweep', 'compile', 'flops', 'loops')
# The 'loops' families whose lax.while_loop stops once every example is fooled.
EARLY_STOPPING = ('Square', 'DeepFool', 'IFGSM-min', 'trust_region')


def _number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _run_tiny(out):
  env = conftest.subprocess_env()  # one CPU device; --skip-peers: no peer installs
  proc = subprocess.run([sys.executable, str(SCRIPT), '--tiny', '--skip-peers', '--out',
                         str(out)], capture_output=True, text=True, timeout=600, env=env,
                        cwd=str(REPO))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = json.loads(out.read_text())
  data['_stdout'] = proc.stdout
  return data


@pytest.mark.slow
def test_tiny_benchmark_writes_every_section_with_numeric_ratios(tmp_path):
  # One test (not three sharing a fixture), so `pytest -n 2` runs the benchmark only once.
  report = _run_tiny(tmp_path / 'tiny.json')
  _check_sections(report)
  _check_ratios(report)
  _check_targets_and_table(report)


def _check_sections(report):
  results = report['results']
  for name in SECTIONS:
    assert name in results, name
    assert 'error' not in results[name], (name, results[name].get('error'),
                                          results[name].get('traceback'))
  m = report['machine']
  assert m['cpu_model'] and m['cores_available'] >= 1 and m['jax']
  # The suite's conftest compiles at -O0; the report must say so beside the figures.
  assert m['jax_disable_most_optimizations'] is True
  assert report['mode'] == 'tiny'
  for peer in ('torch', 'torchattacks', 'foolbox'):
    assert report['peers'][peer]['status'] == 'skipped'


def _check_ratios(report):
  r = report['results']
  for name in ('resnet20', 'lenet_like'):
    adv = r[f'pgd/{name}']['rows']['advdef']
    assert _number(adv['images_per_s']) and adv['images_per_s'] > 0
    assert _number(r[f'train/{name}']['rows']['advdef']['images_per_s'])
    # Peers skipped: their rows say so, and the ratios are absent rather than made up.
    assert r[f'pgd/{name}']['rows']['torch_plain']['status'].startswith('skipped')
    assert r[f'pgd/{name}']['ratios']['vs_torch_plain'] is None
    assert r[f'train/{name}']['ratios']['vs_torch'] is None
    c = r['compile'][f'train/{name}']
    assert _number(c['lower_compile_s']) and _number(c['first_call_minus_steady_s'])
    assert _number(r['compile'][f'pgd/{name}']['lower_compile_s'])
  assert _number(r['sap']['model_pass']['overhead_ratio'])
  assert _number(r['sap']['one_layer']['speedup'])
  assert _number(r['eot']['ratios']['speedup_vs_loop'])
  assert _number(r['eot']['ratios']['diag_vectorized_step_alone_vs_loop'])
  assert r['eot']['rows']['sequential_loop']['median_s'] > 0
  assert _number(r['sweep']['ratios']['speedup_incl_compile'])
  assert _number(r['sweep']['ratios']['speedup_steady_state'])
  f = r['flops']
  assert _number(f['matmul']['peak_flops_per_s']) and f['matmul']['peak_flops_per_s'] > 0
  for name in ('resnet20', 'lenet_like'):
    assert _number(f[name]['train_step']['fraction_of_peak'])
    assert _number(f[name]['attack_step']['fraction_of_peak'])
  anchor = r['sap']['model_pass']['anchor']
  assert anchor['batch'] == 4 and anchor['median_s'] > 0
  _check_loops(r['loops'])


def _check_loops(loops):
  assert loops['batch'] == 2 and loops['steps'] == [1, 2]
  families = loops['families']
  assert list(families) == list(benchmark.MODES['tiny']['loops_families'])
  assert set(families) < set(benchmark.loop_families(0.1, 2))
  for name, f in families.items():
    assert not f['note'].startswith('error'), (name, f['note'], f.get('traceback'))
    if f['ratio'] is None:
      # One repeat of sub-millisecond steps: timing noise may hide the marginal cost, and
      # then the row must say so rather than report a number.
      assert f['note'].startswith('not measured'), (name, f)
    else:
      assert _number(f['ratio']) and f['ratio'] > 0, (name, f)
      assert f['in_loop_step_s'] > 0 and f['step_alone_s'] > 0, (name, f)
    assert f['steps'] == [1, 2] and f['step_alone']
  for name in set(EARLY_STOPPING) & set(families):  # Their settings kept the loop running.
    assert families[name]['still_correct_after_s2'] > 0, (name, families[name])


def _check_targets_and_table(report):
  targets = {t['key']: t for t in report['targets']}
  assert len(targets) == 10
  assert targets['quickstart/cold']['status'] == 'N/A'  # --tiny skips the quick start.
  for key in ('sap/overhead', 'eot/speedup', 'sweep/speedup', 'flops/train_fraction',
              'loops/worst'):
    assert targets[key]['status'] in ('PASS', 'MISS'), targets[key]
    assert _number(targets[key]['value'])
  for key in ('pgd/resnet20', 'pgd/lenet_like', 'train/resnet20', 'train/lenet_like'):
    assert targets[key]['status'] == 'N/A'  # No peers, no verdict.
  out = report['_stdout']
  assert 'Targets:' in out and 'sequential loop' in out and 'matmul' in out
  assert '9 loops' in out and 'step alone' in out


def test_naive_host_sap_keeps_drawn_units_rescaled():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 4, 4, 2)))
  out = np.asarray(benchmark.naive_host_sap(x, np.random.default_rng(0)))
  xs = np.asarray(x)
  assert out.shape == xs.shape
  assert np.all(out[xs == 0] == 0)
  kept = out != 0
  assert kept.any()
  assert np.all(np.abs(out[kept]) >= np.abs(xs[kept]) - 1e-6)  # Kept units are scaled up.
  # Unbiased: the mean over many draws approaches x.
  rng = np.random.default_rng(1)
  mean = np.mean([np.asarray(benchmark.naive_host_sap(x, rng)) for _ in range(400)], axis=0)
  np.testing.assert_allclose(mean, xs, atol=0.25 * float(jnp.max(x)))


def test_benchmark_kappa_sweep_returns_the_documented_fields():
  res = sweep_timing.benchmark_kappa_sweep(values=(0.0, 0.5), attack='pgd(steps=1)',
                                           num_examples=8, batch_size=8)
  assert {'in_graph_seconds', 'separate_seconds', 'ratio', 'num_points'} <= set(res)
  assert res['num_points'] == 2 and res['counts_equal']
  assert res['ratio'] == pytest.approx(res['separate_seconds'] / res['in_graph_seconds'])


def test_loops_target_is_the_worst_measured_family_and_na_without_the_section():
  def loops_target(results):
    return {t['key']: t for t in benchmark.evaluate_targets(results)}['loops/worst']

  assert loops_target({})['status'] == 'N/A'
  assert loops_target({'loops': {'error': 'RuntimeError: boom'}})['status'] == 'N/A'
  families = {'a': {'ratio': 0.9}, 'b': {'ratio': 1.3},
              'c': {'ratio': None, 'note': 'not measured: timing noise'}}
  target = loops_target({'loops': {'families': families}})
  assert target['value'] == 1.3 and target['status'] == 'MISS'
