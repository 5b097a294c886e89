"""The config-sweep CLI (python -m advdef.sweep): runs, skips finished points, shards, gathers
and rejects bad input before compute."""

import json
import pathlib
import subprocess
import sys

import pytest
import conftest

from advdef import config_utils
from advdef import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart(arg):
  module, _ = sweep.load_config_module(str(ROOT / 'configs' / 'quickstart.py'))
  return module, module.get_config(arg)


# A two-point smoke sweep (quickstart's get_sweep('smoke'): seeds 0 and 1), kept to one
# defense and one cheap attack (its accuracy is then the worst case).
CLI_OVERRIDES = ["--config.eval.defenses=('none',)", "--config.eval.attacks=('fgsm',)",
                 '--config.eval.checks=False']


def _smoke_sweep_config():
  module, config = _quickstart('smoke,clean')
  config.eval.update(defenses=('none',), attacks=('fgsm',), checks=False)
  return config, module.get_sweep('smoke')


def _cli(*args, timeout=600):
  env = conftest.subprocess_env()
  return subprocess.run([sys.executable, '-m', 'advdef.sweep', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_shard_then_gather_then_rerun_skips(tmp_path, capsys):
  # Shard 1 of 2 through the command line: only the odd point runs.
  result = _cli('--config=configs/quickstart.py:smoke,clean', f'--workdir={tmp_path}',
                '--shard=1/2', *CLI_OVERRIDES)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'seed=1' / 'report.json').exists()
  assert not (tmp_path / 'seed=0').exists()
  assert not (tmp_path / 'sweep.json').exists()  # Not complete yet.
  assert json.loads((tmp_path / 'seed=1' / 'sweep_point.json').read_text())['overrides'] == {
      'seed': 1}

  # Shard 0 of 2 in-process: the last point; the sweep is complete and gathered.
  config, spec = _smoke_sweep_config()
  res = sweep.run_sweep(config, spec, str(tmp_path), shard=(0, 2))
  assert res.ran == ['seed=0'] and not res.skipped and not res.failed
  for name in ('sweep.json', 'sweep.md', 'sweep.png'):
    assert (tmp_path / name).exists(), name
  gathered = json.loads((tmp_path / 'sweep.json').read_text())
  assert gathered['num_points'] == gathered['num_done'] == 2
  assert [p['overrides'] for p in gathered['points']] == [{'seed': 0}, {'seed': 1}]
  for p in gathered['points']:
    assert set(p['clean_accuracy']) == {'none'}
    assert sorted(w['epsilon'] for w in p['worst_case']) == [0.1, 0.3]
  md = (tmp_path / 'sweep.md').read_text()
  assert '| # | seed | status | none clean | none worst ε=0.1 | none worst ε=0.3 |' in md
  assert md.count('| done |') == 2

  # Rerun everything: both points are finished and skipped, their reports untouched.
  mtimes = {p: (tmp_path / p / 'report.json').stat().st_mtime_ns for p in ('seed=0', 'seed=1')}
  capsys.readouterr()
  res = sweep.run_sweep(config, spec, str(tmp_path))
  assert res.ran == [] and res.skipped == ['seed=0', 'seed=1']
  assert 'skip seed=0 (finished' in capsys.readouterr().err
  assert mtimes == {p: (tmp_path / p / 'report.json').stat().st_mtime_ns for p in mtimes}

  # A finished point made with another config is refused, not silently reused.
  config.train.num_epochs = 1
  with pytest.raises(sweep.SweepError, match=r'different config \(train\.num_epochs: 2 -> 1'):
    sweep.run_sweep(config, spec, str(tmp_path))


def test_cli_bad_shard_and_bad_grid_fail_before_compute(tmp_path):
  result = _cli('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}', '--shard=2/2')
  assert result.returncode == 2
  assert 'advdef.sweep: error: --shard=2/2: i=2 must be in [0, 1]' in result.stderr
  result = _cli('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}',
                '--sweep=zip(seed=(0, 1), train.learning_rate=(0.1,))')
  assert result.returncode == 2 and 'zip of unequal lengths' in result.stderr
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize('shard', ['0/0', '1/1', '-1/2', '1', 'a/b'])
def test_bad_shard(shard):
  with pytest.raises(sweep.SweepError, match='--shard'):
    sweep.parse_shard(shard)


@pytest.mark.parametrize('spec,match', [
    ('', 'empty'),
    ('seed=()', 'empty tuple'),
    ('seed=0', 'tuple of values'),
    ('product()', 'at least one term'),
    ('zip(seed=(0, 1), train.learning_rate=(0.1,))', r'zip of unequal lengths \(seed: 2, '
     r'train\.learning_rate: 1'),
    ('product(seed=(0, 1), seed=(2,))', "'seed' is set twice"),
    ('seed=(0, 0)', 'same overrides'),
    ('train.lr=(0.1,)', r"'train\.lr' names no field.*learning_rate"),
    ('trian.learning_rate=(0.1,)', r"'trian' is not a section.*valid fields of the config"),
    ('train=(1,)', 'is a section'),
    ('seed=(0.5,)', r'override seed=0\.5'),
    ('train.learning_rate=(-0.1,)', r'sweep point 0 \(learning_rate=-0\.1\): train\.learning_rate'),
    ('eval.sweep.values=((),)', r'eval\.sweep\.values'),  # Validated like any config.
    ('foo bar', 'expected field='),
])
def test_bad_grid_is_an_error_naming_it_before_compute(tmp_path, spec, match):
  _, config = _quickstart('smoke,clean')
  if spec.startswith('eval.sweep'):
    config.eval.sweep.update(defense='jump', param='kappa')
  with pytest.raises(sweep.SweepError, match=match):
    sweep.run_sweep(config, spec, str(tmp_path / 'sweep'))
  assert not (tmp_path / 'sweep').exists()


def test_points_product_zip_and_names():
  _, config = _quickstart('smoke,clean')
  points = sweep.make_points(
      config, 'product(zip(train.learning_rate=(0.05, 0.1), train.num_epochs=(1, 2)), '
      'seed=(0, 1, 2))')
  assert [p.name for p in points[:4]] == [
      'learning_rate=0.05,num_epochs=1,seed=0', 'learning_rate=0.05,num_epochs=1,seed=1',
      'learning_rate=0.05,num_epochs=1,seed=2', 'learning_rate=0.1,num_epochs=2,seed=0']
  assert len(points) == 6
  assert points[3].config.train.learning_rate == 0.1 and points[3].config.train.num_epochs == 2
  assert config.train.learning_rate == 0.05 and config.seed == 0  # The base is untouched.
  # Ambiguous last components keep the whole field; tuples are compact.
  p, = sweep.make_points(config, "zip(train.batch_size=(32,), eval.batch_size=(32,), "
                                 "eval.defenses=(('none', 'jump(kappa=0.5)'),))")
  assert p.name == 'train.batch_size=32,eval.batch_size=32,defenses=(none,jump(kappa=0.5))'
  assert p.config.eval.defenses == ('none', 'jump(kappa=0.5)')
  # Explicit points from get_sweep.
  points = sweep.make_points(config, [{'seed': 3}, {'seed': 4, 'train.num_epochs': 1}])
  assert [p.name for p in points] == ['seed=3', 'seed=4,num_epochs=1']


def test_failed_point_is_recorded_and_gather_lists_missing(tmp_path):
  """With a stand-in for experiment.run: one point fails, one succeeds, one is in another
  shard; --gather then writes the summary with each status."""
  _, config = _quickstart('smoke,clean')

  def fake_run(config, workdir, *, progress, prepared):
    del progress, prepared
    if config.train.learning_rate > 1:
      raise FloatingPointError('loss is NaN')
    report = {'config': config_utils.to_dict(config), 'wall_seconds': 1.0, 'rows': [
        {'defense': 'none', 'attack': 'none', 'norm': None, 'epsilon': None, 'accuracy': 0.9},
        {'defense': 'none', 'attack': 'pgd', 'norm': 'linf', 'epsilon': 0.1, 'accuracy': 0.4}]}
    pathlib.Path(workdir, 'report.json').write_text(json.dumps(report))

  spec = 'train.learning_rate=(0.05, 5.0, 0.1)'
  res = sweep.run_sweep(config, spec, str(tmp_path), shard=(0, 2), run_fn=fake_run)
  assert res.ran == ['learning_rate=0.05', 'learning_rate=0.1'] and res.failed == []
  assert not res.gathered
  res = sweep.run_sweep(config, spec, str(tmp_path), shard=(1, 2), run_fn=fake_run)
  assert res.failed == ['learning_rate=5.0'] and not res.gathered
  res = sweep.run_sweep(config, spec, str(tmp_path), gather=True)
  assert res.ran == [] and len(res.gathered) == 3
  points = json.loads((tmp_path / 'sweep.json').read_text())['points']
  assert [p['status'] for p in points] == ['done', 'failed', 'done']
  assert 'loss is NaN' in points[1]['error']
  assert points[0]['worst_case'] == [{'defense': 'none', 'norm': 'linf', 'epsilon': 0.1,
                                      'accuracy': 0.4}]
  md = (tmp_path / 'sweep.md').read_text()
  assert 'failed: FloatingPointError: loss is NaN' in md and md.count('| done |') == 2
