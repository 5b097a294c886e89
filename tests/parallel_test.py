"""Data parallelism (advdef.parallel): the same numbers on 1 and 4 devices, outputs really
sharded, config checks before compute, checkpoints restored into a replicated sharding, and
two processes on localhost (CPU collectives over gloo) training like one.

tests/conftest.py forces 4 virtual CPU devices (XLA_FLAGS).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from advdef import attacks
from advdef import checkpointing
from advdef import config_utils
from advdef import data as data_lib
from advdef import evaluation
from advdef import evaluators
from advdef import models
from advdef import parallel
from advdef import retrofit
from advdef import training
from advdef.evaluators import clean

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 4


@pytest.fixture(scope='module')
def mesh():
  if jax.device_count() < N:
    pytest.skip(f'needs {N} devices (tests/conftest.py forces 4 CPU devices)')
  return parallel.create_mesh(N)


@pytest.fixture(scope='module')
def digits():
  return data_lib.load_dataset({'source': 'digits', 'name': 'digits'})


def _is_spread(x, spec):
  """x lives on all 4 devices, laid out as `spec` over 'data'."""
  return (len(x.sharding.device_set) == N and isinstance(x.sharding, jax.sharding.NamedSharding)
          and x.sharding.spec == spec)


# ----------------------------------------------------------------------------------------
# Mesh, shardings, config checks.


def test_mesh_shardings_and_placement(mesh):
  assert mesh.shape == {'data': N} and mesh.axis_names == ('data',)
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert parallel.create_mesh().shape['data'] == jax.device_count()
  assert parallel.create_mesh(0).shape['data'] == jax.device_count()
  assert parallel.create_mesh(2).devices.tolist() == jax.devices()[:2]
  batch = parallel.shard_batch({'image': np.zeros((8, 3, 3, 1), np.float32),
                                'label': np.arange(8)}, mesh)
  assert _is_spread(batch['image'], jax.P('data')) and _is_spread(batch['label'], jax.P('data'))
  assert [s.data.shape for s in batch['label'].addressable_shards] == [(2,)] * N
  params = parallel.replicate({'w': jnp.ones((3, 2)), 'key': jax.random.key(0)}, mesh)
  assert _is_spread(params['w'], jax.P()) and len(params['key'].sharding.device_set) == N
  np.testing.assert_array_equal(parallel.to_numpy(batch['label']), np.arange(8))
  with pytest.raises(ValueError, match='multiple of the device count'):
    parallel.shard_batch(np.zeros((6, 2)), mesh)


@pytest.mark.parametrize('num_devices,match', [
    (-1, r'parallel.num_devices=-1 must be an integer >= 0'),
    (N + 1, rf'parallel.num_devices={N + 1} exceeds the {N} available'),
])
def test_bad_num_devices_names_the_field(mesh, num_devices, match):
  config = config_utils.base_config()
  config.parallel.num_devices = num_devices
  with pytest.raises(ValueError, match=match):
    parallel.validate_config(config)


def test_batch_sizes_must_divide_the_device_count(mesh):
  config = config_utils.base_config()
  config.train.batch_size, config.eval.batch_size = 128, 250
  with pytest.raises(ValueError, match=r'eval.batch_size=250 is not divisible by the 4 devices'
                     r'.*multiple of 4 \(e.g. 252\)'):
    parallel.validate_config(config)
  config.train.batch_size, config.eval.batch_size = 30, 256
  with pytest.raises(ValueError, match='train.batch_size=30'):
    parallel.validate_config(config)
  config.parallel.num_devices = 2  # 30 = 2 x 15 on two devices is fine.
  assert parallel.validate_config(config).shape['data'] == 2
  config.parallel.num_devices = 1
  config.train.batch_size, config.eval.batch_size = 7, 13
  assert parallel.validate_config(config).shape['data'] == 1
  # A config from before data parallelism (no parallel section) gets all devices.
  old = ml_collections.ConfigDict({'train': {'batch_size': 8, 'checkpoint': ''},
                                   'eval': {'batch_size': 8}})
  assert parallel.validate_config(old).shape['data'] == jax.device_count()


def test_distributed_is_off_unless_asked(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  assert not parallel.initialize_distributed(config_utils.base_config())
  config = config_utils.base_config()
  config.parallel.coordinator_address = 'no-port'
  with pytest.raises(ValueError, match='parallel.coordinator_address'):
    parallel.initialize_distributed(config)


# ----------------------------------------------------------------------------------------
# Train step: 1 device vs 4.


class TinyBN(nn.Module):
  """conv-BatchNorm-relu-dense: its batch statistics need the whole (sharded) batch."""
  num_classes: int = 10
  hook: object = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _train(model, splits, mesh, *, steps, batch_size=64, train_defense='none', **augment):
  """`steps` train steps from a fixed init; mesh=None is the plain single-device path."""
  spe = data_lib.steps_per_epoch(len(splits.train_labels), batch_size)
  tx = optax.sgd(0.05, momentum=0.9)
  state = training.create_train_state(jax.random.key(0), model, tx, splits.info.image_shape)
  images, labels = splits.train_images, splits.train_labels.astype(np.int32)
  perm = data_lib.epoch_permutation(jax.random.key(1), 0, len(labels))
  if mesh is not None:
    state, images, labels, perm = parallel.replicate((state, images, labels, perm), mesh)
  step = training.make_train_step(model, tx, training.StepConfig(
      batch_size=batch_size, steps_per_epoch=spe, train_defense=train_defense, **augment),
      mesh=mesh)
  history = []
  for _ in range(steps):
    state, metrics = step(state, images, labels, perm, jax.random.key(2))
    history.append(metrics)
  return state, history, step


def _assert_close_trees(a, b, rtol=2e-4, atol=2e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_train_steps_match_one_device(mesh, digits):
  # small_cnn with augmentation and RSE noise in training: random draws under sharding.
  model = models.create_model('small_cnn', num_classes=10, mean=digits.info.mean,
                              std=digits.info.std)
  kwargs = dict(steps=4, train_defense='rse(sigma_init=0.1, sigma_inner=0.05)', crop_padding=1,
                flip=True)
  one, one_hist, _ = _train(model, digits, None, **kwargs)
  four, four_hist, step = _train(model, digits, mesh, **kwargs)
  _assert_close_trees(one.params, four.params)
  _assert_close_trees(one_hist, four_hist)
  assert int(four.step) == 4
  for leaf in jax.tree.leaves(four):
    assert _is_spread(leaf, jax.P()), leaf.sharding  # Parameters stay replicated.
  for value in four_hist[-1].values():
    assert len(value.sharding.device_set) == N


def test_batch_norm_statistics_span_the_devices(mesh):
  splits = data_lib.load_dataset({'source': 'fake', 'name': 'fake', 'fake_shape': (6, 6, 1),
                                  'fake_num_train': 96, 'fake_num_test': 8})
  one, one_hist, _ = _train(TinyBN(), splits, None, steps=3, batch_size=32)
  four, four_hist, step = _train(TinyBN(), splits, mesh, steps=3, batch_size=32)
  _assert_close_trees(one.params, four.params)
  _assert_close_trees(one.batch_stats, four.batch_stats)
  _assert_close_trees(one_hist, four_hist)
  # The compiled step is data parallel: XLA all-reduces the per-device gradients.
  args = parallel.replicate((splits.train_images, splits.train_labels,
                             jnp.arange(96, dtype=jnp.int32)), mesh)
  assert 'all-reduce' in step.lower(four, *args, jax.random.key(2)).compile().as_text()


def test_drawn_batch_is_sharded_inside_jit(mesh, digits):
  images = parallel.replicate(digits.train_images, mesh)
  labels = parallel.replicate(digits.train_labels, mesh)
  perm = parallel.replicate(jnp.arange(len(labels), dtype=jnp.int32), mesh)

  @jax.jit
  def draw(images, labels, perm):
    batch = data_lib.train_batch(images, labels, perm, 1, jax.random.key(0), batch_size=32)
    return parallel.constrain_batch(batch, mesh)

  x, y = draw(images, labels, perm)
  assert _is_spread(x, jax.P('data')) and _is_spread(y, jax.P('data'))
  np.testing.assert_array_equal(parallel.to_numpy(y), digits.train_labels[32:64])


def test_one_device_mesh_is_bit_identical_to_no_mesh(digits):
  plain, plain_hist, _ = _train(TinyBN(), digits, None, steps=2, crop_padding=1, flip=True)
  one, one_hist, _ = _train(TinyBN(), digits, parallel.create_mesh(1), steps=2, crop_padding=1,
                            flip=True)
  for a, b in zip(jax.tree.leaves((plain, plain_hist)), jax.tree.leaves((one, one_hist))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# Attack and evaluation: 1 device vs 4.


@pytest.fixture(scope='module')
def trained(digits):
  """small_cnn after a few steps, and the first 64 test examples."""
  model = models.create_model('small_cnn', num_classes=10, mean=digits.info.mean,
                              std=digits.info.std)
  state, _, _ = _train(model, digits, None, steps=10)
  return model, training.variables_of(state), digits.test_images[:64], digits.test_labels[:64]


@pytest.mark.parametrize('spec,eot', [('none', 1), ('rse(sigma_init=0.1, sigma_inner=0.05)', 2)])
def test_pgd_matches_one_device(mesh, trained, spec, eot):
  model, variables, images, labels = trained
  x, y = data_lib.to_float(images), labels.astype(np.int32)

  def run(variables, x, y):
    logits_fn = retrofit.make_logits_fn(model, variables, retrofit.build_hook(spec))
    return jax.jit(lambda x, y, k: attacks.pgd(logits_fn, k, x, y, eps=0.1, steps=3,
                                               eot_samples=eot))(x, y, jax.random.key(3))

  one = np.asarray(run(variables, x, y))
  four = run(parallel.replicate(variables, mesh), *parallel.shard_batch((x, y), mesh))
  assert _is_spread(four, jax.P('data'))
  four = parallel.to_numpy(four)
  assert np.max(np.abs(four - x)) <= 0.1 + 1e-6
  # sign(gradient) may flip where a gradient entry is ~0 and rounding differs.
  assert np.mean(np.abs(four - one) > 1e-5) < 0.01


def test_clean_rows_match_one_device(mesh, trained):
  model, variables, images, labels = trained
  config = config_utils.base_config()
  config.eval.update(batch_size=24, num_draws=3,  # 64 = 24 + 24 + 16 padded and masked.
                     defenses=('none', 'sap(frac=1.0)'))
  key = jax.random.key(4)  # for score_predictions below; clean rows use the seed's stream
  one = clean.evaluate(evaluators.make_context(config, model, variables, images, labels,
                                               mesh=parallel.create_mesh(1)))['rows']
  four = clean.evaluate(evaluators.make_context(config, model, variables, images, labels,
                                                mesh=mesh))['rows']
  for a, b in zip(one, four):
    assert a['n'] == b['n'] == 64 and a['defense'] == b['defense']
    assert a['accuracy'] == b['accuracy']
    for field in ('nll', 'brier', 'ece'):
      assert abs(a[field] - b[field]) < 1e-5, (a['defense'], field)
    assert a.get('per_draw_accuracy') == b.get('per_draw_accuracy')
  # score_predictions with the batch spread over the devices.
  logits_fn = retrofit.make_logits_fn(model, parallel.replicate(variables, mesh))
  predict = evaluation.make_predict_fn(logits_fn, stochastic=False, num_draws=1)
  probs, _ = predict(parallel.shard_batch(data_lib.to_float(images[:24]), mesh), key)
  assert _is_spread(probs, jax.P('data'))
  row = evaluation.score_predictions(predict, images, labels, 24, key, stochastic=False,
                                     mesh=mesh, return_correct=True)
  assert row['accuracy'] == one[0]['accuracy'] and row['_correct'].shape == (64,)


# ----------------------------------------------------------------------------------------
# Checkpoints into a replicated target.


def test_checkpoint_restores_into_a_replicated_target(mesh, tmp_path, digits):
  model = models.create_model('small_cnn', num_classes=10)
  tx = optax.sgd(0.1, momentum=0.9)
  state = training.create_train_state(jax.random.key(5), model, tx, (8, 8, 1))
  fingerprint = {'model': 'small_cnn'}
  with checkpointing.Checkpointer(tmp_path / 'single', fingerprint=fingerprint) as ckpt:
    ckpt.save(1, state)
  target = parallel.replicate(jax.tree.map(jnp.zeros_like, state), mesh)
  with checkpointing.Checkpointer(tmp_path / 'single', fingerprint=fingerprint) as ckpt:
    restored = ckpt.restore(target=target)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert _is_spread(a, jax.P())
    np.testing.assert_array_equal(parallel.to_numpy(a), np.asarray(b))
  # And back: a checkpoint of a replicated state restores onto one device.
  with checkpointing.Checkpointer(tmp_path / 'replicated', fingerprint=fingerprint) as ckpt:
    ckpt.save(2, restored)
    back = ckpt.restore(target=jax.eval_shape(lambda: state))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert len(a.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# main: bad parallel settings fail before compute.


@pytest.mark.parametrize('override,field', [
    ('--config.parallel.num_devices=5', 'parallel.num_devices=5 exceeds the 4 available'),
    ('--config.eval.batch_size=66', 'eval.batch_size=66 is not divisible by the 4 devices'),
])
def test_main_refuses_bad_parallel_settings_before_compute(tmp_path, override, field):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-m', 'advdef.main',
                           '--config=configs/quickstart.py:smoke,clean', f'--workdir={tmp_path}',
                           override], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert field in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


# ----------------------------------------------------------------------------------------
# Two processes on localhost, 2 CPU devices each, one 4-device mesh.

_WORKER = textwrap.dedent('''
    import sys
    import numpy as np

    def train(parallel, steps=3):
      """A few data-parallel small_cnn steps on digits; every process gets the same result."""
      import jax, optax
      from advdef import data as data_lib, models, training
      splits = data_lib.load_dataset({'source': 'digits', 'name': 'digits'})
      mesh = parallel.create_mesh()
      model = models.create_model('small_cnn', num_classes=10, mean=splits.info.mean,
                                  std=splits.info.std)
      tx = optax.sgd(0.05, momentum=0.9)
      state = training.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
      perm = data_lib.epoch_permutation(jax.random.key(1), 0, len(splits.train_labels))
      state, images, labels, perm = parallel.replicate(
          (state, splits.train_images, splits.train_labels.astype(np.int32), perm), mesh)
      step = training.make_train_step(
          model, tx, training.StepConfig(batch_size=64, steps_per_epoch=22, crop_padding=1),
          mesh=mesh)
      losses = []
      for _ in range(steps):
        state, metrics = step(state, images, labels, perm, jax.random.key(2))
        losses.append(float(metrics['loss']))
      # Each process feeds only its own rows of an evaluation batch.
      x = data_lib.to_float(splits.test_images[:64])
      rows = parallel.process_rows(64)
      xg = parallel.global_batch(x[rows], mesh)
      logits = jax.jit(lambda v, x: model.apply(v, x))(training.variables_of(state), xg)
      return state, np.asarray(losses), parallel.to_numpy(logits), xg

    if __name__ == '__main__':
      process_id, port, out, ckpt_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
      import ml_collections
      from advdef import checkpointing, parallel
      config = ml_collections.ConfigDict({'parallel': dict(
          num_devices=0, distributed=True, coordinator_address=f'127.0.0.1:{port}',
          num_processes=2, process_id=process_id)})
      assert parallel.initialize_distributed(config)
      import jax, jax.numpy as jnp
      assert jax.process_count() == 2 and jax.device_count() == 4
      assert jax.local_device_count() == 2
      mesh = parallel.create_mesh()
      # A global reduction over an array whose halves live in different processes.
      g = parallel.shard_batch(np.arange(8, dtype=np.float32), mesh)
      assert not g.is_fully_addressable
      total = float(jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))(g))
      state, losses, logits, xg = train(parallel)
      assert xg.shape[0] == 64 and not xg.is_fully_addressable
      # orbax writes collectively and restores into the replicated target.
      with checkpointing.Checkpointer(ckpt_dir, fingerprint={'model': 'small_cnn'}) as ckpt:
        ckpt.save(3, state)
        restored = ckpt.restore(3, target=jax.tree.map(jnp.zeros_like, state))
      same = all(bool(np.array_equal(parallel.to_numpy(a), parallel.to_numpy(b)))
                 for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
      params = [parallel.to_numpy(p) for p in jax.tree.leaves(state.params)]
      if jax.process_index() == 0:
        np.savez(out, total=total, losses=losses, logits=logits, restored_equal=same,
                 **{f'p{i}': p for i, p in enumerate(params)})
      jax.distributed.shutdown()
''')


def test_two_processes_train_like_one(mesh, tmp_path, run_processes):
  out = tmp_path / 'out.npz'
  results_of = run_processes(_WORKER, lambda i, port: [i, port, out, tmp_path / 'checkpoints'],
                             devices_per_process=2, timeout=150)
  for i, (returncode, log) in enumerate(results_of):
    assert returncode == 0, f'process {i}:\n{log[-3000:]}'
  got = np.load(out)
  assert float(got['total']) == 28.0 and bool(got['restored_equal'])
  # The same computation in this one process on its 4 devices.
  namespace = {'__name__': 'reference'}
  exec(compile(_WORKER, 'worker', 'exec'), namespace)
  state, losses, logits, _ = namespace['train'](parallel)
  np.testing.assert_allclose(got['losses'], losses, rtol=1e-5)
  np.testing.assert_allclose(got['logits'], logits, rtol=1e-4, atol=1e-5)
  for i, p in enumerate(jax.tree.leaves(state.params)):
    np.testing.assert_allclose(got[f'p{i}'], np.asarray(p), rtol=2e-4, atol=2e-5)
