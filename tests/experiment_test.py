"""End to end: main on tiny configs, validation before compute, determinism, resume after
an interruption and after kill -9, workdir fingerprint, load_run."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import conftest

from advdef import experiment
from advdef import runs
from advdef import metric_writers
from advdef import training

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(arg='smoke,clean'):
  import importlib.util
  spec = importlib.util.spec_from_file_location('quickstart', ROOT / 'configs' / 'quickstart.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _main(*args, timeout=600):
  env = conftest.subprocess_env()
  return subprocess.run([sys.executable, '-m', 'advdef.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _params(workdir):
  run = runs.load_run(str(workdir))
  return jax.tree_util.tree_leaves(jax.device_get(run.variables))


@pytest.mark.slow
def test_main_smoke_end_to_end_writes_the_report(tmp_path):
  result = _main('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['model'] == 'small_cnn' and report['dataset'] == 'digits:digits'
  clean = [r for r in report['rows'] if r['attack'] == 'none']
  assert [r['defense'] for r in clean] == ['none', 'sap(frac=1.0)', 'jump(kappa=0.5)',
                                           'rse(sigma_init=0.2,sigma_inner=0.1)']
  for row in clean:
    assert row['n'] == 64 and 0 <= row['accuracy'] <= 1
    assert {'nll', 'ece', 'brier'} <= set(row)
  assert 'per_draw_accuracy' in clean[1] and 'per_draw_accuracy' not in clean[0]
  attacked = [r for r in report['rows'] if r['attack'] != 'none']
  assert attacked and report['checks']
  # Gradient health and randomness detection share one program per defense: both ran, and
  # the randomness each defense declares was detected (SAP and RSE vary, the others do not).
  by_name = {(c['defense'], c['name']): c for c in report['checks']}
  for defense in [r['defense'] for r in clean]:
    assert by_name[(defense, 'randomness_detected')]['status'] == 'pass', by_name
    assert by_name[(defense, 'gradient_health')]['status'] in ('pass', 'warn')
  assert 'logits vary' in by_name[('sap(frac=1.0)', 'randomness_detected')]['detail']
  assert 'do not vary' in by_name[('none', 'randomness_detected')]['detail']
  md = (tmp_path / 'report.md').read_text()
  assert 'sap(frac=1.0)' in md
  assert (tmp_path / 'accuracy_vs_epsilon.png').stat().st_size > 1000
  assert (tmp_path / 'training_curves.png').exists()
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents*'))
  lines = metric_writers.read_metrics(tmp_path)
  assert lines[-1]['step'] == report['training']['steps']


@pytest.mark.parametrize('override,field', [
    ('--config.train.batch_size=0', 'train.batch_size'),
    ('--config.train.learning_rate=-0.1', 'train.learning_rate'),
    ('--config.model.name=resnet18', 'model.name'),
    ('--config.data.source=imagenet', 'data.source'),
    ("--config.eval.defenses=('none','sapp')", 'eval.defenses'),
    ("--config.eval.epsilons=(-0.1,)", 'eval.epsilons'),
    ("--config.eval.attacks=('pgdd',)", 'eval.attacks'),
    ('--config.train.optimizer=adagrad', 'train.optimizer'),
])
def test_bad_config_fails_before_compute_with_one_message(tmp_path, override, field):
  (tmp_path / 'report.json').write_text('{"complete": true}')
  result = _main('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}', override,
                 timeout=120)
  assert result.returncode == 2
  assert field in result.stderr
  assert 'Traceback' not in result.stderr
  assert (tmp_path / 'report.json').read_text() == '{"complete": true}'
  assert not (tmp_path / 'checkpoints').exists()


def test_misspelt_field_is_rejected_by_the_locked_config(tmp_path):
  result = _main('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}',
                 '--config.train.num_epoch=3', timeout=120)
  assert result.returncode != 0 and 'num_epoch' in result.stderr


def _train(config, workdir):
  prepared = experiment.prepare(config)
  splits, model = prepared.splits, prepared.model
  writer = metric_writers.MetricWriter(str(workdir), tensorboard=False)
  try:
    state, summary = training.train_and_evaluate(config, str(workdir), model, splits,
                                                 writer=writer, progress=False)
  finally:
    writer.close()
  return state, summary


def test_same_seed_same_result_and_resume_equals_uninterrupted(tmp_path):
  config = _config()
  config.train.num_epochs = 4
  config.train.checkpoint_every_epochs = 1
  full, full_summary = _train(config, tmp_path / 'full')
  again, _ = _train(config, tmp_path / 'again')
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  # A crash after 2 of 4 epochs, then the same command again.
  _train_partial(config, tmp_path / 'resumed', stop_after_epochs=2)
  resumed, resumed_summary = _train(config, tmp_path / 'resumed')
  assert resumed_summary['resumed_from'] > 0
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert resumed_summary['final_test'] == full_summary['final_test']
  strip = lambda lines: [{k: v for k, v in l.items() if k != 'time'} for l in lines]
  assert strip(metric_writers.read_metrics(tmp_path / 'resumed')) == strip(
      metric_writers.read_metrics(tmp_path / 'full'))


def _train_partial(config, workdir, stop_after_epochs):
  """Trains with the full schedule but stops (like a crash) after some epochs."""
  splits = experiment.prepare(config).splits
  spe = len(splits.train_labels) // config.train.batch_size
  original = training.make_train_step

  def limited(*args, **kwargs):
    step = original(*args, **kwargs)
    calls = {'n': 0}

    def wrapped(state, *a):
      if calls['n'] >= stop_after_epochs * spe:
        raise KeyboardInterrupt
      calls['n'] += 1
      return step(state, *a)
    return wrapped

  training.make_train_step = limited
  try:
    _train(config, workdir)
  except KeyboardInterrupt:
    pass
  finally:
    training.make_train_step = original


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_like_an_uninterrupted_run(tmp_path):
  args = ['--config=configs/quickstart.py:smoke,clean', '--config.train.num_epochs=6',
          '--config.train.checkpoint_every_epochs=1']
  reference = _main(*args, f'--workdir={tmp_path / "ref"}')
  assert reference.returncode == 0, reference.stderr[-2000:]
  env = conftest.subprocess_env()
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen([sys.executable, '-m', 'advdef.main', *args, f'--workdir={workdir}'],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [p for p in (workdir / 'checkpoints').glob('[0-9]*') if p.name.isdigit()]
    if steps or proc.poll() is not None:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  rerun = _main(*args, f'--workdir={workdir}')
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  ref = json.loads((tmp_path / 'ref' / 'report.json').read_text())
  got = json.loads((workdir / 'report.json').read_text())
  assert got['training']['final_test'] == ref['training']['final_test']
  assert got['rows'] == ref['rows'] or [
      {k: v for k, v in r.items() if k != 'seconds'} for r in got['rows']] == [
      {k: v for k, v in r.items() if k != 'seconds'} for r in ref['rows']]
  for a, b in zip(_params(tmp_path / 'ref'), _params(workdir)):
    np.testing.assert_array_equal(a, b)


def test_workdir_of_another_model_is_refused(tmp_path):
  config = _config()
  config.train.num_epochs = 1
  _train(config, tmp_path)
  other = _config()
  other.model.name = 'lenet5_caffe'
  other.data.update(source='fake', name='fake28', fake_shape=(28, 28, 1))
  with pytest.raises(ValueError, match="model 'small_cnn' on 'digits:digits'.*"
                     "model 'lenet5_caffe' on 'fake:fake28'"):
    _train(other, tmp_path)


def test_load_run_and_trained_checkpoint_skip_training(tmp_path):
  config = _config()
  config.train.num_epochs = 2
  state, summary = _train(config, tmp_path / 'run')
  metric_writers.MetricWriter(str(tmp_path / 'run'), tensorboard=False).write_hparams(
      experiment.config_utils.to_dict(config))
  run = runs.load_run(str(tmp_path / 'run'))
  x = run.splits.test_images.astype(np.float32) / 255.0
  preds = np.argmax(np.asarray(run.logits_fn(x)), -1)
  accuracy = float(np.mean(preds == run.splits.test_labels))
  assert abs(accuracy - summary['final_test']['accuracy']) < 1e-9
  # A config naming the trained run evaluates it without training.
  config.train.checkpoint = str(tmp_path / 'run')
  report = experiment.run(config, str(tmp_path / 'eval_only'), progress=False)
  assert report['training'] == {'loaded_from': str(tmp_path / 'run')}
  clean = report['rows'][0]
  assert clean['defense'] == 'none'
  assert abs(clean['accuracy'] - float(np.mean(preds[:64] == run.splits.test_labels[:64]))) < 1e-9
  assert not (tmp_path / 'eval_only' / 'checkpoints').exists()


def test_main_refuses_a_workdir_of_another_model_with_one_message(tmp_path):
  config = _config()
  config.train.num_epochs = 1
  _train(config, tmp_path)
  result = _main('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}',
                 '--config.model.name=lenet5_caffe', '--config.data.source=fake',
                 '--config.data.name=fake28', '--config.data.fake_shape=(28, 28, 1)', timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "holds checkpoints of model 'small_cnn'" in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_mnist_lenet_smoke_on_the_npz_source(tmp_path, mnist10k_path, monkeypatch):
  import importlib.util
  spec = importlib.util.spec_from_file_location('mnist_lenet', ROOT / 'configs' / 'mnist_lenet.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('source=npz,smoke')
  config.data.path = str(mnist10k_path)
  assert 'sap(frac=1.0)' in config.eval.defenses
  # The npz source end to end; SAP's evaluation is covered by the quick start's smoke run,
  # and here its compiles would double the test's time (about 100 s on 2 cores).
  config.eval.defenses = tuple(d for d in config.eval.defenses if not d.startswith('sap'))
  report = experiment.run(config, str(tmp_path), progress=False)
  clean = {r['defense']: r for r in report['rows'] if r['attack'] == 'none'}
  assert set(clean) == {'none', 'jump(kappa=0.5)'}
  assert clean['none']['n'] == 128
  assert clean['none']['accuracy'] > 0.5  # 32 steps on 512 real digits already learn
  pgd = [r for r in report['rows'] if r['attack'].startswith('pgd')]
  assert pgd and all(r['epsilon'] == 0.3 for r in pgd)
