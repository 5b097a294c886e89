"""Operational safety of a run: the workdir lock, damaged checkpoints, misspelt config fields,
the NaN stop's message, and importing advdef from any directory."""

import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tomllib

import jax
import numpy as np
import pytest
import setuptools
import conftest

from advdef import checkpointing
from advdef import experiment
from advdef import metric_writers
from advdef import training
from advdef import version
from advdef import workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
# quickstart's smoke run with a checkpoint every epoch: steps 22 and 44 (1,437 digits, B=64).
SMOKE = ('--config=configs/quickstart.py:smoke,clean', '--config.train.checkpoint_every_epochs=1')
STEPS_PER_EPOCH = 22


def _config(arg='smoke,clean'):
  import importlib.util
  spec = importlib.util.spec_from_file_location('quickstart', ROOT / 'configs' / 'quickstart.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.train.checkpoint_every_epochs = 1
  return config


def _train(config, workdir):
  prepared = experiment.prepare(config)
  writer = metric_writers.MetricWriter(str(workdir), tensorboard=False)
  try:
    return training.train_and_evaluate(config, str(workdir), prepared.model, prepared.splits,
                                       writer=writer, progress=False)
  finally:
    writer.close()


def _main(*args, cwd=ROOT, timeout=300):
  env = conftest.subprocess_env()
  return subprocess.run([sys.executable, '-m', 'advdef.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _truncate_checkpoint(workdir, step):
  files = [p for p in (workdir / 'checkpoints' / str(step)).rglob('*') if p.is_file()]
  assert files
  for path in files:
    path.write_bytes(b'')


def _write_lock(workdir, **record):
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'host': socket.gethostname(), 'start_time': '2026-11-28 09:01:02 UTC', **record}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))
  return workdir / workdir_lock.LOCK_FILE


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


# ---------------------------------------------------------------------------------------------
# Workdir lock.


def test_lock_records_the_holder_and_refuses_a_second_holder(tmp_path):
  with workdir_lock.hold(tmp_path / 'run') as path:
    record = json.loads(path.read_text())
    assert record['host'] == socket.gethostname() and record['pid'] == os.getpid()
    assert record['start_time'].endswith(' UTC')
    with pytest.raises(workdir_lock.WorkdirInUseError) as error:
      with workdir_lock.hold(tmp_path / 'run'):
        pass
    message = str(error.value)
    assert (f'workdir {tmp_path / "run"} is in use by pid {os.getpid()} on host '
            f'{socket.gethostname()} since {record["start_time"]} (lock file {path})') in message
    assert 'wait for it or remove the lock' in message
    assert path.exists()  # The refused attempt leaves the holder's lock alone.
  assert not path.exists()


@pytest.mark.parametrize('exit_with', [RuntimeError('boom'), SystemExit(2), KeyboardInterrupt()])
def test_lock_is_released_on_every_exit(tmp_path, exit_with):
  with pytest.raises(type(exit_with)):
    with workdir_lock.hold(tmp_path):
      raise exit_with
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  with workdir_lock.hold(tmp_path):  # And can be taken again.
    pass


def test_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = _dead_pid()
  _write_lock(tmp_path, pid=pid, token='old')
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(tmp_path) as path:
      assert json.loads(path.read_text())['pid'] == os.getpid()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and 'stale lock' in warnings[0] and f'pid {pid}' in warnings[0]


def test_own_pid_in_a_lock_we_do_not_hold_is_stale(tmp_path):
  # A container restarted on a persistent workdir often gets the pid of the run it replaced.
  _write_lock(tmp_path, pid=os.getpid(), token='previous container')
  with workdir_lock.hold(tmp_path) as path:
    assert json.loads(path.read_text()).get('token') != 'previous container'


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
  path = _write_lock(tmp_path, host='gpu-node-7', pid=1234)
  before = path.read_text()
  with pytest.raises(workdir_lock.WorkdirInUseError, match=(
      r'in use by pid 1234 on host gpu-node-7 since 2026-11-28 09:01:02 UTC .*another host.*'
      rf'rm {path}')):
    workdir_lock.acquire(tmp_path)
  assert path.read_text() == before


def test_unreadable_lock_and_a_takeover_in_progress_are_not_broken(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, '_SETTLE_SECONDS', 0.2)
  path = tmp_path / workdir_lock.LOCK_FILE
  path.write_text('')  # Created by O_EXCL, its writer died before writing.
  with pytest.raises(workdir_lock.WorkdirInUseError, match='not a lock record'):
    workdir_lock.acquire(tmp_path)
  # Another run holds the breaker: it is removing this stale lock; we must not as well.
  _write_lock(tmp_path, pid=_dead_pid())
  (tmp_path / (workdir_lock.LOCK_FILE + '.break')).write_text('{}')
  with pytest.raises(workdir_lock.WorkdirInUseError, match='taking it over'):
    workdir_lock.acquire(tmp_path)
  assert path.exists()


def test_main_refuses_a_workdir_in_use_with_one_line(tmp_path):
  # This test's process is alive on this host: the lock is held.
  path = _write_lock(tmp_path, pid=os.getpid(), token='theirs')
  result = _main(*SMOKE, f'--workdir={tmp_path}', timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('advdef: error')]
  assert errors == [
      f'advdef: error: workdir {tmp_path} is in use by pid {os.getpid()} on host '
      f'{socket.gethostname()} since 2026-11-28 09:01:02 UTC (lock file {path}); wait for it '
      f'or remove the lock if that process is gone (rm {path})']
  assert 'Traceback' not in result.stderr
  assert json.loads(path.read_text())['token'] == 'theirs'
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'config.json').exists()


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 2-epoch smoke run with checkpoints at steps 22 and 44; its final params."""
  workdir = tmp_path_factory.mktemp('trained')
  state, _ = _train(_config(), workdir)
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  return workdir, jax.tree_util.tree_leaves(jax.device_get(training.variables_of(state)))


def test_resume_falls_back_past_a_truncated_checkpoint(trained, tmp_path, caplog):
  source, final = trained
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  _truncate_checkpoint(workdir, 2 * STEPS_PER_EPOCH)
  damaged = workdir / 'checkpoints' / str(2 * STEPS_PER_EPOCH)
  config = _config()
  with caplog.at_level(logging.WARNING):
    state, summary = _train(config, workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f'checkpoint step {2 * STEPS_PER_EPOCH} ({damaged}) could not be read' in w
             for w in warnings), warnings
  assert any(f'resuming from checkpoint step {STEPS_PER_EPOCH}' in w for w in warnings), warnings
  assert summary['resumed_from'] == STEPS_PER_EPOCH
  # Resuming replays the same steps: the same model as the run before the damage.
  got = jax.tree_util.tree_leaves(jax.device_get(training.variables_of(state)))
  for a, b in zip(final, got):
    np.testing.assert_array_equal(a, b)
  # The damaged step was written again and reads back.
  prepared = experiment.prepare(config)
  info = prepared.splits.info
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    variables = training.load_variables(str(workdir), prepared.model, info,
                                        expected_fingerprint=training.fingerprint(config, info))
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  for a, b in zip(final, jax.tree_util.tree_leaves(jax.device_get(variables))):
    np.testing.assert_array_equal(a, b)


def test_loading_a_run_skips_a_damaged_newest_checkpoint_and_deletes_nothing(trained, tmp_path,
                                                                             caplog):
  source, _ = trained
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  _truncate_checkpoint(workdir, 2 * STEPS_PER_EPOCH)
  config = _config()
  prepared = experiment.prepare(config)
  info = prepared.splits.info
  with caplog.at_level(logging.WARNING):
    variables = training.load_variables(str(workdir), prepared.model, info,
                                        expected_fingerprint=training.fingerprint(config, info))
  assert variables['params']
  assert any(f'checkpoint step {2 * STEPS_PER_EPOCH}' in r.getMessage() for r in caplog.records)
  assert (workdir / 'checkpoints' / str(2 * STEPS_PER_EPOCH)).is_dir()
  # An explicit step is that step or an error.
  with pytest.raises(checkpointing.CheckpointsUnreadableError, match=(
      f'none of the checkpoints in {workdir / "checkpoints"} could be read')):
    checkpointing.restore_variables(workdir, {'params': variables['params']},
                                    step=2 * STEPS_PER_EPOCH)


def test_main_with_every_checkpoint_damaged_fails_with_one_line(trained, tmp_path):
  source, _ = trained
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  for step in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
    _truncate_checkpoint(workdir, step)
  # Also a lock left by a killed run: taken over with a warning, released at the exit.
  dead = _dead_pid()
  lock = _write_lock(workdir, pid=dead, token='killed')
  result = _main(*SMOKE, f'--workdir={workdir}')
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('advdef: error')]
  ckpt_dir = workdir / 'checkpoints'
  assert len(errors) == 1 and errors[0].startswith(
      f'advdef: error: none of the checkpoints in {ckpt_dir} could be read (steps [22, 44]; '
      'step 44: JSONDecodeError'), result.stderr[-3000:]
  assert f'delete {ckpt_dir} to train from scratch, or use another --workdir' in errors[0]
  for step in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
    assert f'checkpoint step {step} ({ckpt_dir / str(step)}) could not be read' in result.stderr
    assert (ckpt_dir / str(step)).is_dir()  # None readable: nothing deleted.
  assert f'taking over the stale lock {lock} of pid {dead}' in result.stderr
  assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# Misspelt config fields.


@pytest.mark.parametrize('override,message', [
    ('--config.train.learning_rat=0.1',
     'unknown config field train.learning_rat; did you mean train.learning_rate?'),
    ('--config.eval.num_drawz=3',
     'unknown config field eval.num_drawz; did you mean eval.num_draws?'),
    ('--config.trian.num_epochs=1', 'unknown config field trian; did you mean train?'),
    ('--config.train.augment.flipp=True',
     'unknown config field train.augment.flipp; did you mean train.augment.flip?'),
])
def test_misspelt_config_field_is_one_line_with_the_closest_fields(tmp_path, override, message):
  result = _main('--config=configs/quickstart.py', override, f'--workdir={tmp_path / "w"}',
                 timeout=60)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [f'advdef: error: {message}']
  assert not (tmp_path / 'w').exists()  # Refused before anything is written.


def test_a_field_without_a_close_match_lists_the_valid_ones(tmp_path):
  result = _main('--config=configs/quickstart.py', '--config.train.zzzz=1',
                 f'--workdir={tmp_path}', timeout=60)
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith('advdef: error: unknown config field train.zzzz; valid fields of '
                         'train: augment, batch_size,') and 'learning_rate' in line


def test_help_still_prints_the_flags():
  result = _main('--help', timeout=60)
  assert '--workdir' in result.stdout and '--config' in result.stdout
  assert 'Traceback' not in result.stderr and 'advdef: error' not in result.stderr


# ---------------------------------------------------------------------------------------------
# The NaN stop.


def test_nan_before_the_first_checkpoint_says_none_was_written(tmp_path):
  config = _config()
  config.train.learning_rate = 1e12  # Diverges within the first log interval (5 steps).
  with pytest.raises(training.NonFiniteLossError) as error:
    _train(config, tmp_path)
  message = str(error.value)
  assert 'no checkpoint has been written yet' in message and 'step None' not in message
  assert 'between steps 0 and 5' in message and 'train.learning_rate' in message


def test_nan_after_a_checkpoint_names_it():
  message = training.non_finite_message(float('nan'), 40, 45, 44)
  assert message == ('training loss became nan between steps 40 and 45; the last good '
                     'checkpoint (step 44) is kept. Lower train.learning_rate or check the data.')


# ---------------------------------------------------------------------------------------------
# Importing advdef from any directory (notebooks; `pip install -e .`).


def test_advdef_imports_from_another_directory(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', 'import advdef, sys; print(advdef.__file__)'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert pathlib.Path(result.stdout.strip()) == ROOT / 'advdef' / '__init__.py'


_IMPORT_ALL = '''
import importlib, os, pkgutil
# Third-party packages first: only advdef's own import-time code is under test.
import absl.flags, flax, jax, matplotlib, ml_collections, numpy, optax, orbax.checkpoint, tqdm

def cwd(*args):
  raise AssertionError('the working directory was read at import time')

os.getcwd = os.getcwdb = cwd  # also what os.path.abspath and Path.resolve/cwd call
import advdef
names = sorted(m.name for m in pkgutil.walk_packages(advdef.__path__, 'advdef.'))
for name in names:
  importlib.import_module(name)
print(len(names))
'''


def test_no_module_depends_on_the_working_directory_at_import(tmp_path):
  # An empty working directory: a relative path read at import time fails too.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _IMPORT_ALL], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  modules = [p for p in (ROOT / 'advdef').rglob('*.py') if p.name != '__init__.py']
  assert int(result.stdout.split()[-1]) >= len(modules)


def test_pyproject_installs_every_subpackage_at_the_package_version():
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  assert project['project']['name'] == 'advdef'
  assert project['project']['version'] == version.__version__
  assert project['project']['requires-python'] == '>=3.11'
  include = project['tool']['setuptools']['packages']['find']['include']
  found = set(setuptools.find_packages(str(ROOT), include=include))
  on_disk = {'.'.join(p.parent.relative_to(ROOT).parts) for p in (ROOT / 'advdef').rglob('*.py')}
  assert on_disk <= found, on_disk - found  # A folder without __init__.py would be left out.
  assert not [p for p in found if not p.startswith('advdef')]
