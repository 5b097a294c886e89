"""Pruned export: the authors' FLOPs/memory counts, exactness of the exported network,
shapes, errors, save/load and the timing helper."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import models
from advdef import pruned_export
from advdef import pruning

LENET, VGG = ('lenet5_caffe', (28, 28, 1)), ('vgg16_anp', (32, 32, 3))


# The authors' counting code (flops/utils.py, memory/utils.py), transcribed as an independent
# reference; vgg_memory counts the dense layers once (their loop counts them 13 times).
def _authors_conv_flops(h, w, c_in, c_out, k, padding=0):
  n = k * k * c_in
  ho, wo = h - k + 2 * padding + 1, w - k + 2 * padding + 1
  return c_out * ho * wo * (2 * n - 1) + 2 * c_out * ho * wo


def _authors_dense_flops(d_in, d_out, activation=True):
  return (2 * d_in - 1) * d_out + d_out + (d_out if activation else 0)


def _authors_conv_memory(h, w, c_in, c_out, k, padding=0, batch_norm=False):
  n = k * k * c_in
  ho, wo = h - k + 2 * padding + 1, w - k + 2 * padding + 1
  return n * ho * wo + n * c_out + (2 * c_out if batch_norm else 0)


def _authors_dense_memory(d_in, d_out, batch_norm=False):
  return d_in * d_out + d_out + (2 * d_in if batch_norm else 0)


def _authors_lenet_flops(u):
  return (_authors_conv_flops(28, 28, 1, u[0], 5) + u[0] * 12 * 12 * 4
          + _authors_conv_flops(12, 12, u[0], u[1], 5) + u[1] * 4 * 4 * 4
          + _authors_dense_flops(u[2], u[3]) + _authors_dense_flops(u[3], 10, activation=False))


def _authors_vgg(u, n_classes=10):
  c, h = [3] + list(u), [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
  pools = {1: 32, 3: 16, 6: 8, 9: 4, 12: 2}  # after conv i (0-based), input size of the pool
  flops = mem = 0
  for i in range(13):
    flops += _authors_conv_flops(h[i], h[i], c[i], c[i + 1], 3, padding=1)
    if i in pools:
      flops += c[i + 1] * (pools[i] // 2) ** 2 * 4
    mem += _authors_conv_memory(h[i], h[i], c[i], c[i + 1], 3, padding=1, batch_norm=True)
  flops += _authors_dense_flops(u[13], u[14]) + _authors_dense_flops(u[14], n_classes)
  mem += _authors_dense_memory(u[13], u[14], batch_norm=True) + _authors_dense_memory(u[14],
                                                                                      n_classes)
  return flops, mem


def test_lenet_dense_counts_equal_hand_computed_authors_numbers():
  r = pruned_export.count_flops_and_memory('lenet5_caffe', None, (28, 28, 1), 10)
  # lenet_conv_flops([20, 50, 800, 500]) by hand:
  #   conv1 49*24*24*20 + 2*20*576 = 587520; pool 20*12*12*4 = 11520;
  #   conv2 999*8*8*50 + 2*50*64 = 3203200; pool 50*4*4*4 = 3200;
  #   fc1 1599*500 + 500 + 500 = 800500; fc2 999*10 + 10 = 10000.
  assert r['flops_dense'] == r['flops_pruned'] == 4615940
  # lenet_memory: 25*576 + 25*20 + 500*64 + 500*50 + 800*500 + 500 + 500*10 + 10.
  assert r['memory_dense'] == r['memory_pruned'] == 477410
  assert r['flops_speedup'] == 1.0 and r['memory_percent'] == 100.0


def test_pruned_counts_follow_the_authors_formulas():
  lenet_units = [7, 19, 123, 45]
  sites = ['conv1_out', 'conv2_out', 'fc1_in', 'fc2_in']
  r = pruned_export.count_flops_and_memory('lenet5_caffe', dict(zip(sites, lenet_units)))
  assert r['flops_pruned'] == _authors_lenet_flops(lenet_units)
  assert r['flops_dense'] == _authors_lenet_flops([20, 50, 800, 500])
  assert r['flops_speedup'] > 1 and r['memory_percent'] < 100

  full = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
  pruned = [30, 41, 100, 90, 200, 150, 120, 300, 250, 200, 100, 80, 60, 70, 90]
  vgg_sites = [f'conv{i}_out' for i in range(1, 14)] + ['fc1_in', 'fc2_in']
  r = pruned_export.count_flops_and_memory('vgg16_anp', dict(zip(vgg_sites, pruned)))
  assert (r['flops_dense'], r['memory_dense']) == _authors_vgg(full)
  assert (r['flops_pruned'], r['memory_pruned']) == _authors_vgg(pruned)
  assert r['flops_speedup'] > 1 and r['memory_percent'] < 100
  with pytest.raises(ValueError, match='conv14_out'):
    pruned_export.count_flops_and_memory('vgg16_anp', {'conv14_out': 3})


def _masked_setup(name, shape, seed, *, normalize='none', prune_frac=0.5, all_pruned=()):
  """A masked model whose masks prune ~prune_frac of each site (a_uc = -20: E[pi] ~ 5e-5),
  the rest random and non-trivial; for VGG random BN params and batch_stats too."""
  model = models.create_model(name, num_classes=10, normalize=normalize,
                              mean=(0.4,) * shape[-1], std=(0.3,) * shape[-1])
  masked = model.clone(hook=pruning.mask_hook(pruning.default_placement(name), training=False))
  # pruning's mask multiplies [.., C] by z[C]: allow that broadcast under the strict
  # rank-promotion mode of conftest (the masked reference only; the export never needs it).
  with jax.numpy_rank_promotion('allow'):
    variables = flax.core.unfreeze(models.init_variables(masked, jax.random.key(seed), shape))
  rng = np.random.default_rng(seed)
  params = variables['params']
  for site, (a_uc, _) in pruning.mask_params(params).items():
    n = a_uc.shape[0]
    a = rng.uniform(0.0, 4.0, n)
    a[rng.random(n) < prune_frac] = -20.0
    if site in all_pruned:
      a[:] = -20.0
    params[site]['bb_a_uc'] = jnp.asarray(a, jnp.float32)
    params[site]['bb_b_uc'] = jnp.asarray(rng.uniform(0.0, 2.0, n), jnp.float32)
  for bn, stats in variables.get('batch_stats', {}).items():
    n = stats['mean'].shape[0]
    stats['mean'] = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
    stats['var'] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    params[bn]['scale'] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    params[bn]['bias'] = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
  x = jax.random.uniform(jax.random.key(seed + 1), (4, *shape))
  with jax.numpy_rank_promotion('allow'):
    reference = np.asarray(masked.apply(variables, x, train=False))
  return model, variables, x, reference


def _assert_logits_close(out, reference):
  scale = max(1.0, float(np.max(np.abs(reference))))
  np.testing.assert_allclose(np.asarray(out), reference, rtol=0, atol=1e-4 * scale)


@pytest.fixture(scope='module')
def vgg():
  model, variables, x, reference = _masked_setup(*VGG, seed=3, normalize='per_image')
  return model, variables, x, reference, pruned_export.export_pruned(model, variables)


def test_lenet_export_equals_masked_model_and_is_smaller():
  model, variables, x, reference = _masked_setup(*LENET, seed=0, normalize='dataset')
  pm = pruned_export.export_pruned(model, variables)
  _assert_logits_close(jax.jit(pm.apply)(x), reference)
  masks = pruning.test_masks(variables['params'])
  p = pm.params
  assert p['conv1']['kernel'].shape == (5, 5, 1, int(np.sum(masks['conv1_out'] > 0)))
  assert p['conv2']['kernel'].shape[2] == p['conv1']['kernel'].shape[3]
  assert p['conv2']['kernel'].shape[3] <= int(np.sum(masks['conv2_out'] > 0))
  # fc1 reads only flat positions whose conv2 channel is kept and whose fc1_in mask is on.
  assert p['fc1']['kernel'].shape[0] == p['fc1']['gather'].shape[0] < 800
  assert p['fc1']['kernel'].shape[1] == p['fc2']['kernel'].shape[0] == int(
      np.sum(masks['fc2_in'] > 0))
  assert pm.num_params < models.count_params(variables) // 2
  assert pm.active_units == pruning.sparsity_summary(variables['params'])['active_units']
  r = pruned_export.count_flops_and_memory(pm.model_name, pm.active_units, pm.input_shape,
                                           pm.num_classes)
  assert r['flops_speedup'] > 1.5 and r['memory_percent'] < 60


def test_vgg_export_equals_masked_model_with_constant_pruned_channels(vgg):
  model, variables, x, reference, pm = vgg
  masks = pruning.test_masks(variables['params'])
  # The case that needs the bias maps: pruned channels that are nonzero after BN + ReLU.
  p, st = variables['params']['bn5'], variables['batch_stats']['bn5']
  c = np.maximum(p['bias'] - p['scale'] * st['mean'] / np.sqrt(st['var'] + 1e-3), 0)
  assert np.any((masks['conv5_out'] == 0) & (c > 0))
  assert pm.params['conv6']['bias'].shape == (8, 8, pm.params['conv6']['kernel'].shape[3])
  _assert_logits_close(jax.jit(pm.apply)(x), reference)
  for i in range(1, 14):
    kept = pm.params[f'conv{i}']['kernel'].shape[3]
    assert 0 < kept <= int(np.sum(masks[f'conv{i}_out'] > 0))
  assert pm.params['conv1']['kernel'].shape[3] == int(np.sum(masks['conv1_out'] > 0))
  assert pm.params['fc2']['kernel'].shape == (int(np.sum(masks['fc2_in'] > 0)), 10)


def test_fully_pruned_masks_keep_one_zero_unit_and_stay_exact():
  model, variables, x, reference = _masked_setup(*LENET, seed=5,
                                                 all_pruned=('conv2_out', 'fc2_in'))
  pm = pruned_export.export_pruned(model, variables)
  assert pm.params['conv2']['kernel'].shape[3] == 1
  assert pm.params['fc2']['kernel'].shape == (1, 10)
  assert not np.any(np.asarray(pm.params['fc2']['kernel']))
  _assert_logits_close(pm.apply(x), reference)


def test_unsupported_model_raises_naming_model_name():
  model = models.create_model('vgg16', num_classes=10)  # head='rse': no plan
  with pytest.raises(ValueError, match=r"model\.name='vgg16'.*lenet5_caffe, vgg16_anp"):
    pruned_export.export_pruned(model, {'params': {}})
  with pytest.raises(ValueError, match=r'model\.name'):
    pruned_export.count_flops_and_memory('resnet20', None)


def test_save_load_round_trip(vgg, tmp_path):
  _, _, x, _, pm = vgg
  path = pruned_export.save_pruned(tmp_path / 'vgg', pm)
  loaded = pruned_export.load_pruned(path)
  assert loaded.plan == pm.plan and loaded.model_name == 'vgg16_anp'
  assert loaded.active_units == pm.active_units and loaded.num_params == pm.num_params
  assert (loaded.normalize, loaded.mean, loaded.std) == (pm.normalize, pm.mean, pm.std)
  np.testing.assert_array_equal(loaded.apply(x), pm.apply(x))
  with np.load(path, allow_pickle=False) as data:  # no pickled objects in the file
    assert 'conv1/kernel' in data.files


def test_measure_speedup_reports_both_timings():
  model, variables, _, _ = _masked_setup(*LENET, seed=1, prune_frac=0.8)
  pm = pruned_export.export_pruned(model, variables)
  with jax.numpy_rank_promotion('allow'):  # the masked dense forward (see _masked_setup)
    r = pruned_export.measure_speedup(model, variables, pm, batch_size=8, repeats=3)
  assert r['dense_ms'] > 0 and r['pruned_ms'] > 0 and r['batch_size'] == 8
  assert r['measured_speedup'] == pytest.approx(r['dense_ms'] / r['pruned_ms'])
  assert r['device'] == jax.devices()[0].device_kind
