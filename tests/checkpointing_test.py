"""Tests for advdef.checkpointing: roundtrips, retention, fingerprints and crash safety."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from advdef import checkpointing
from advdef.checkpointing import Checkpointer, restore_variables

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FINGERPRINT = {'model': 'lenet_like', 'dataset': 'npz:mnist10k', 'num_classes': 10,
               'image_shape': [28, 28, 1]}


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


def _make_state(seed=0, updates=2):
  """A TrainState whose Adam moments are non-trivial, so a mixed-up leaf would show."""
  key = jax.random.key(seed)
  k1, k2 = jax.random.split(key)
  params = {'dense': {'kernel': jax.random.normal(k1, (6, 5)), 'bias': jnp.zeros((5,))},
            'head': {'kernel': jax.random.normal(k2, (5, 3)).astype(jnp.bfloat16)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  opt_state = tx.init(params)
  for i in range(updates):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
    updates_, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates_)
  return TrainState(step=jnp.asarray(updates, jnp.int32), params=params,
                    batch_stats={'bn': {'mean': jnp.arange(5, dtype=jnp.float32),
                                        'var': jnp.ones((5,), jnp.float32)}},
                    opt_state=opt_state)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_train_state_with_optax_state(tmp_path):
  state = _make_state()
  with Checkpointer(tmp_path / 'checkpoints', fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.save(2, state)
  with Checkpointer(tmp_path / 'checkpoints', fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() == 2
    # A zeroed target of the same structure: every value must come from disk.
    restored = ckpt.restore(target=jax.tree.map(jnp.zeros_like, state))
    assert isinstance(restored, TrainState)
    _assert_trees_equal(restored, state)
    # An abstract target (what jax.eval_shape gives) works the same and yields jax arrays.
    restored = ckpt.restore(2, target=jax.eval_shape(lambda: state))
    _assert_trees_equal(restored, state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))


def test_restore_uses_target_sharding(tmp_path):
  state = {'w': jnp.arange(32.0).reshape(8, 4)}
  with Checkpointer(tmp_path / 'checkpoints', fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(1, state)
    mesh = jax.make_mesh((4,), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    target = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}
    restored = ckpt.restore(target=target)
  assert restored['w'].sharding == sharding
  np.testing.assert_array_equal(restored['w'], state['w'])


def test_keep_last_n(tmp_path):
  directory = tmp_path / 'checkpoints'
  with Checkpointer(directory, keep=2, fingerprint=FINGERPRINT) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, {'x': jnp.full((3,), step)})
    assert ckpt.all_steps() == [4, 5]
  assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ['4', '5', 'deleted_steps']
  assert not any((directory / 'deleted_steps').iterdir())
  with Checkpointer(directory, keep=2, fingerprint=FINGERPRINT) as ckpt:
    np.testing.assert_array_equal(ckpt.restore(4, target={'x': jnp.zeros((3,), jnp.int32)})['x'], 4)


def _file_count(path):
  return sum(len(names) for _, _, names in os.walk(path))


def test_old_steps_leave_the_listing_in_one_rename(tmp_path, monkeypatch):
  # orbax's own deletion unlinks a step's files one by one, so a kill in the middle left a
  # listed step that failed to restore (CI, the kill -9 test). Emptying the trash switched
  # off: step 1 must have left whole, every file moved into deleted_steps/1 at once.
  directory = tmp_path / 'checkpoints'
  monkeypatch.setattr(Checkpointer, '_empty_deleted_steps', lambda self: None)
  with Checkpointer(directory, keep=2, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(1, {'x': jnp.full((3,), 1)})
    files_per_step = _file_count(directory / '1')
    ckpt.save(2, {'x': jnp.full((3,), 2)})
    ckpt.save(3, {'x': jnp.full((3,), 3)})
    assert ckpt.all_steps() == [2, 3]
  assert files_per_step >= 3
  assert _file_count(directory / 'deleted_steps' / '1') == files_per_step
  assert _file_count(directory / '2') == files_per_step
  monkeypatch.undo()
  with Checkpointer(directory, keep=2, fingerprint=FINGERPRINT) as ckpt:  # Opening empties it.
    assert not any((directory / 'deleted_steps').iterdir())
    assert ckpt.all_steps() == [2, 3]
    np.testing.assert_array_equal(ckpt.restore(2, target={'x': jnp.zeros((3,), jnp.int32)})['x'], 2)


def test_emptying_the_trash_cut_short_is_finished_by_the_next_checkpointer(tmp_path, monkeypatch):
  directory = tmp_path / 'checkpoints'
  real_rmtree = checkpointing.shutil.rmtree

  def rmtree_killed_half_way(path, **kwargs):
    del kwargs
    for root, _, names in os.walk(path):
      os.unlink(os.path.join(root, names[0]))
      break
    raise KeyboardInterrupt  # Stands in for the process dying after one file.

  with pytest.raises(KeyboardInterrupt):
    with Checkpointer(directory, keep=1, fingerprint=FINGERPRINT) as ckpt:
      ckpt.save(1, {'x': jnp.full((3,), 1)})
      monkeypatch.setattr(checkpointing.shutil, 'rmtree', rmtree_killed_half_way)
      ckpt.save(2, {'x': jnp.full((3,), 2)})
  monkeypatch.setattr(checkpointing.shutil, 'rmtree', real_rmtree)
  damaged = directory / 'deleted_steps' / '1'
  assert damaged.is_dir() and 0 < _file_count(damaged)  # The damaged copy is left over ...
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ['2']  # ... unlisted.
  with Checkpointer(directory, keep=1, fingerprint=FINGERPRINT) as ckpt:
    assert not any((directory / 'deleted_steps').iterdir())
    np.testing.assert_array_equal(ckpt.restore(target={'x': jnp.zeros((3,), jnp.int32)})['x'], 2)


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path / 'checkpoints', keep=None, save_interval_steps=3,
                    fingerprint=FINGERPRINT) as ckpt:
    saved = [step for step in range(1, 11) if ckpt.save(step, {'x': jnp.ones(2)})]
    assert saved == [3, 6, 9]
    assert ckpt.save(10, {'x': jnp.ones(2)}, force=True)
    # A forced final save on an already saved step is a no-op, not an error.
    assert not ckpt.save(10, {'x': jnp.ones(2)}, force=True)
    assert ckpt.all_steps() == [3, 6, 9, 10]


def test_empty_directory(tmp_path):
  with Checkpointer(tmp_path / 'checkpoints', fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
      ckpt.restore(target={'x': jnp.zeros(2)})


def test_fingerprint_written_once_and_mismatch_raises(tmp_path):
  directory = tmp_path / 'checkpoints'
  with Checkpointer(directory, fingerprint=FINGERPRINT) as ckpt:
    ckpt.check_compatible()
    ckpt.save(1, {'x': jnp.ones(2)})
  stored = json.loads((directory / 'fingerprint.json').read_text())
  assert stored == FINGERPRINT
  # Tuples in a config equal the lists read back from JSON.
  same = dict(FINGERPRINT, image_shape=(28, 28, 1))
  with Checkpointer(directory, fingerprint=same) as ckpt:
    ckpt.check_compatible()

  other = {'model': 'resnet20', 'dataset': 'cifar10', 'num_classes': 10, 'image_shape': [32, 32, 3]}
  with Checkpointer(directory, fingerprint=other) as ckpt:
    with pytest.raises(ValueError) as excinfo:
      ckpt.check_compatible()
    message = str(excinfo.value)
    for needle in ("'lenet_like'", "'npz:mnist10k'", "'resnet20'", "'cifar10'", 'image_shape',
                   '--workdir', str(directory)):
      assert needle in message
    # save/restore refuse too, even without an explicit check_compatible().
  with Checkpointer(directory, fingerprint=other) as ckpt:
    with pytest.raises(ValueError, match='resnet20'):
      ckpt.save(2, {'x': jnp.ones(2)})
  # The first fingerprint stays; the mismatching Checkpointers did not overwrite it.
  assert json.loads((directory / 'fingerprint.json').read_text()) == FINGERPRINT
  # A difference in a key other than model/dataset is caught as well.
  with Checkpointer(directory, fingerprint=dict(FINGERPRINT, num_classes=100)) as ckpt:
    with pytest.raises(ValueError, match='num_classes'):
      ckpt.check_compatible()


def test_half_written_temporary_directory_is_ignored(tmp_path):
  directory = tmp_path / 'checkpoints'
  with Checkpointer(directory, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(5, {'x': jnp.full((4,), 5.0)})
  # What a save killed midway leaves: orbax's temporary directory, never renamed to '7'.
  tmp = directory / '7.orbax-checkpoint-tmp'
  (tmp / 'default').mkdir(parents=True)
  (tmp / 'default' / 'garbage').write_bytes(b'\x00' * 100)
  with Checkpointer(directory, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() == 5
    np.testing.assert_array_equal(ckpt.restore(target={'x': jnp.zeros(4)})['x'], 5.0)
    # The same step can be saved again afterwards; the leftover is cleaned up.
    assert ckpt.save(7, {'x': jnp.full((4,), 7.0)})
    np.testing.assert_array_equal(ckpt.restore(target={'x': jnp.zeros(4)})['x'], 7.0)
  assert not tmp.exists()


def test_async_save(tmp_path):
  state = _make_state(seed=3)
  with Checkpointer(tmp_path / 'checkpoints', async_save=True, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.save(1, state)
    ckpt.wait()
    _assert_trees_equal(ckpt.restore(1, target=state), state)


def test_restore_variables_reads_only_the_named_entries(tmp_path):
  state = _make_state(seed=1)
  with Checkpointer(tmp_path / 'checkpoints', fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(10, state)
    ckpt.save(20, state.replace(params=jax.tree.map(lambda p: p + 1, state.params)))
  target = {'params': jax.eval_shape(lambda: state.params), 'batch_stats': state.batch_stats}
  # The workdir works as well as its checkpoints/ directory.
  variables = restore_variables(tmp_path, target, step=10, expected_fingerprint=FINGERPRINT)
  assert set(variables) == {'params', 'batch_stats'}
  _assert_trees_equal(variables['params'], state.params)
  _assert_trees_equal(variables['batch_stats'], state.batch_stats)
  latest = restore_variables(tmp_path / 'checkpoints', target)
  np.testing.assert_array_equal(latest['params']['dense']['bias'], state.params['dense']['bias'] + 1)
  with pytest.raises(ValueError, match='resnet20'):
    restore_variables(tmp_path, target, expected_fingerprint=dict(FINGERPRINT, model='resnet20'))
  with pytest.raises(FileNotFoundError, match='available steps'):
    restore_variables(tmp_path, target, step=15)


_SAVE_LOOP = textwrap.dedent('''
    import sys
    import numpy as np
    from advdef.checkpointing import Checkpointer

    def state_at(step):
      return {'step': np.asarray(step, np.int32),
              'w': np.full((512, 1024), step, np.float32),   # 2 MiB, so saves take a moment.
              'b': np.arange(1000, dtype=np.float32) + step}

    ckpt = Checkpointer(sys.argv[1], keep=2, fingerprint={'model': 'm', 'dataset': 'd'})
    start = ckpt.latest_step()
    if start is not None:  # Resume exactly like training does.
      restored = ckpt.restore(target=state_at(0))
      assert int(restored['step']) == start and (restored['w'] == start).all()
    step = (start or 0) + 1
    while True:
      if ckpt.save(step, state_at(step)):
        print(step, flush=True)
      step += 1
''')


def test_kill_9_during_save_loop_leaves_a_restorable_latest_step(tmp_path):
  directory = tmp_path / 'checkpoints'
  script = tmp_path / 'save_loop.py'
  script.write_text(_SAVE_LOOP)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
  rng = random.Random(0)
  last_reported = 0
  for _ in range(2):  # The second round resumes from what the first kill left.
    proc = subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
      first = None
      deadline = time.monotonic() + 60
      while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, 'the save loop exited early'
        first = int(line) if first is None else first
        if int(line) >= first + 2:
          break
      time.sleep(rng.uniform(0.0, 0.05))  # Land somewhere inside a later save.
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)
      reported = [int(l) for l in [line, *proc.stdout.read().split()]]
    finally:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
      proc.stdout.close()
    assert reported[0] > last_reported
    last_reported = reported[-1]
    with Checkpointer(directory, keep=2, fingerprint={'model': 'm', 'dataset': 'd'}) as ckpt:
      latest = ckpt.latest_step()
      # A save that finished but was killed before printing may add one step.
      assert latest in (last_reported, last_reported + 1)
      target = {'step': np.zeros((), np.int32), 'w': np.zeros((512, 1024), np.float32),
                'b': np.zeros(1000, np.float32)}
      restored = ckpt.restore(target=target)
      assert int(restored['step']) == latest
      np.testing.assert_array_equal(restored['w'], latest)
      np.testing.assert_array_equal(restored['b'], np.arange(1000, dtype=np.float32) + latest)
      # Every listed step is complete, not just the latest.
      for step in ckpt.all_steps():
        np.testing.assert_array_equal(ckpt.restore(step, target=target)['w'], step)
    last_reported = latest


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError, match='keep'):
    Checkpointer(tmp_path / 'c', keep=0, fingerprint=FINGERPRINT)
  with pytest.raises(ValueError, match='save_interval_steps'):
    Checkpointer(tmp_path / 'c', save_interval_steps=0, fingerprint=FINGERPRINT)
  assert checkpointing.FINGERPRINT_FILE == 'fingerprint.json'
