"""Models: shapes, parameter counts, sites, normalization, registry errors."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from advdef import layers
from advdef import models

SHAPES = {
    'small_cnn': (8, 8, 1), 'lenet_like': (28, 28, 1), 'lenet5_caffe': (28, 28, 1),
    'resnet20': (32, 32, 3), 'resnet20_postact': (32, 32, 3), 'vgg16': (32, 32, 3),
    'vgg16_anp': (32, 32, 3),
}
# Parameter counts of the reference architectures (trainable params only).
EXPECTED_PARAMS = {
    'lenet_like': 260 + 5020 + 38520 + 10890 + 910,   # conv1, conv2, fc120, fc90, fc10
    'lenet5_caffe': 520 + 25050 + 400500 + 5010,       # the classic 431k LeNet-5-Caffe
}


def _model(name, shape, **kw):
  c = shape[-1]
  return models.create_model(name, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c, **kw)


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_forward_shapes_and_finite(name):
  shape = SHAPES[name]
  model = _model(name, shape)
  variables = models.init_variables(model, jax.random.key(0), shape)
  x = jax.random.uniform(jax.random.key(1), (3, *shape))
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (3, 10)
  assert bool(jnp.all(jnp.isfinite(logits)))
  if name in EXPECTED_PARAMS:
    assert models.count_params(variables) == EXPECTED_PARAMS[name]


def test_resnet20_is_resnet20_sized():
  model = _model('resnet20', (32, 32, 3))
  n = models.count_params(models.init_variables(model, jax.random.key(0), (32, 32, 3)))
  assert 0.26e6 < n < 0.28e6  # ResNet-20 has ~0.27M parameters.


def test_wide_resnet_depth_validation_and_size():
  model = _model('wide_resnet', (32, 32, 3), depth=10, widen=1)
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  assert model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape == (2, 10)
  with pytest.raises(ValueError, match='6n\\+4'):
    bad = _model('wide_resnet', (32, 32, 3), depth=30, widen=1)
    models.init_variables(bad, jax.random.key(0), (32, 32, 3))


def test_sites_listed_in_call_order_with_kinds():
  sites = models.list_sites(_model('lenet5_caffe', (28, 28, 1)), (28, 28, 1))
  assert sites == [
      ('conv1_in', 'conv_in'), ('conv1_out', 'conv_out'), ('act1', 'act'),
      ('conv2_in', 'conv_in'), ('conv2_out', 'conv_out'), ('act2', 'act'),
      ('fc1_in', 'dense_in'), ('act3', 'act'), ('fc2_in', 'dense_in')]


def test_resnet20_has_a_site_for_every_relu_and_conv():
  sites = models.list_sites(_model('resnet20', (32, 32, 3)), (32, 32, 3))
  kinds = [k for _, k in sites]
  assert kinds.count('act') == 19       # 2 per unit x 9 units + the final one
  assert kinds.count('conv_in') == 22   # conv0 + 2 per unit + 3 projections
  assert kinds.count('conv_out') == 22


def test_hook_sees_sites_and_can_change_the_output():
  model = _model('small_cnn', (8, 8, 1))
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  seen = []

  def hook(site, h):
    seen.append((site.site_name, site.kind, site.is_model_input))
    return models.plain_hook(site, h)

  same = model.clone(hook=hook).apply(variables, x)
  np.testing.assert_array_equal(same, model.apply(variables, x))
  assert seen[0] == ('conv1_in', 'conv_in', True)
  assert all(not first for _, _, first in seen[1:])
  # Zeroing the input of the last dense layer leaves only its bias.
  zero_fc2 = lambda site, h: h * 0 if site.site_name == 'fc2_in' else models.plain_hook(site, h)
  out = model.clone(hook=zero_fc2).apply(variables, x)
  np.testing.assert_allclose(out, jnp.broadcast_to(variables['params']['fc2']['bias'], (2, 10)))


def test_normalization_modes():
  x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
  np.testing.assert_allclose(models.normalize_images(x, 'dataset', (0.5,) * 3, (0.25,) * 3),
                             (x - 0.5) / 0.25, rtol=1e-6)
  z = models.normalize_images(x, 'per_image', None, None)
  np.testing.assert_allclose(jnp.mean(z, axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(z, axis=(1, 2, 3)), 1.0, rtol=1e-4)
  assert models.normalize_images(x, 'none', None, None) is x
  with pytest.raises(ValueError, match='model.normalize'):
    models.normalize_images(x, 'zscore', None, None)


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='lenet_like.*resnet20'):
    models.create_model('resnet18', num_classes=10)


def test_train_mode_updates_batch_stats_and_uses_dropout():
  model = _model('lenet_like', (28, 28, 1))
  variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(a, b)  # dropout is active in training
  model = _model('resnet20', (32, 32, 3))
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  _, updates = model.apply(variables, jnp.ones((2, 32, 32, 3)), train=True,
                           mutable=['batch_stats'])
  before = jax.tree_util.tree_leaves(variables['batch_stats'])
  after = jax.tree_util.tree_leaves(updates['batch_stats'])
  assert any(not np.allclose(u, v) for u, v in zip(before, after))


@pytest.mark.parametrize('strides, padding', [(1, 'SAME'), (2, 'SAME'), (2, 'VALID')])
def test_canonical_conv_gradients_equal_jax_own(strides, padding):
  lhs = jax.random.normal(jax.random.key(0), (3, 9, 9, 4))
  rhs = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  dn = ('NHWC', 'HWIO', 'NHWC')
  plain = lambda l, r: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      l, r, (strides, strides), padding, dimension_numbers=dn)))
  canonical = lambda l, r: jnp.sum(jnp.sin(layers.canonical_conv(
      l, r, (strides, strides), padding, dimension_numbers=dn)))
  np.testing.assert_allclose(canonical(lhs, rhs), plain(lhs, rhs), rtol=1e-6)
  for want, got in zip(jax.grad(plain, (0, 1))(lhs, rhs), jax.grad(canonical, (0, 1))(lhs, rhs)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_channels, kernel, padding', [
    (1, 3, 'SAME'), (1, 3, 'VALID'), (3, 3, 'SAME'), (2, 3, ((2, 0), (1, 1)))])
def test_overlap_add_input_gradient_equals_the_transposed_convolution(in_channels, kernel,
                                                                       padding):
  assert in_channels < layers.NARROW_INPUT_CHANNELS  # these take the overlap-add on CPU
  lhs = jax.random.normal(jax.random.key(0), (3, 9, 8, in_channels))
  rhs = jax.random.normal(jax.random.key(1), (kernel, kernel, in_channels, 5))
  assert not layers._space_to_depth_input_gradient(rhs.shape)
  dn = ('NHWC', 'HWIO', 'NHWC')
  plain = lambda l, r: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      l, r, (1, 1), padding, dimension_numbers=dn)))
  canonical = lambda l, r: jnp.sum(jnp.sin(layers.canonical_conv(
      l, r, (1, 1), padding, dimension_numbers=dn)))
  want, got = jax.grad(plain)(lhs, rhs), jax.grad(canonical)(lhs, rhs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(got, 0 * got)
  # The compiled input gradient has no convolution left (the forward pass keeps its own).
  text = jax.jit(jax.grad(canonical)).lower(lhs, rhs).compile().as_text()
  assert text.count('dim_labels=') == 1, text.count('dim_labels=')


@pytest.mark.parametrize('shape, kernel, padding', [
    ((3, 28, 28, 1), (5, 5, 1, 10), ((0, 0), (0, 0))),   # lenet_like's conv1: even output
    ((2, 9, 7, 1), (3, 3, 1, 4), ((1, 1), (1, 1))),      # odd output: the last block is cropped
    ((2, 9, 8, 2), (3, 4, 2, 5), ((2, 0), (1, 2))),      # asymmetric pads, rectangular kernel
    ((1, 6, 6, 3), (1, 1, 3, 2), ((0, 0), (0, 0)))])     # 1x1
def test_space_to_depth_conv_equals_the_convolution(shape, kernel, padding):
  lhs = jax.random.normal(jax.random.key(0), shape)
  rhs = jax.random.normal(jax.random.key(1), kernel)
  want = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = layers._space_to_depth_conv(lhs, rhs, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_channels, out_channels, padding', [
    (1, 10, 'VALID'), (10, 20, 'VALID'), (3, 4, 'SAME'), (2, 3, ((4, 1), (0, 2)))])
def test_space_to_depth_input_gradient_equals_jax_own(in_channels, out_channels, padding):
  lhs = jax.random.normal(jax.random.key(0), (2, 13, 12, in_channels))
  rhs = jax.random.normal(jax.random.key(1), (5, 5, in_channels, out_channels))
  dn = ('NHWC', 'HWIO', 'NHWC')
  assert layers._space_to_depth_input_gradient(rhs.shape)
  plain = lambda l: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      l, rhs, (1, 1), padding, dimension_numbers=dn)))
  canonical = jax.jit(lambda l: jnp.sum(jnp.sin(layers.canonical_conv(
      l, rhs, (1, 1), padding, dimension_numbers=dn))))
  np.testing.assert_allclose(jax.grad(canonical)(lhs), jax.grad(plain)(lhs), rtol=1e-5,
                             atol=1e-5)
  # The compiled input gradient is the blocked convolution: 3x3 taps from 4 * O to 4 * I.
  text = jax.jit(jax.grad(canonical)).lower(lhs).compile().as_text()
  assert f'f32[3,3,{4 * out_channels},{4 * in_channels}]' in text


def test_one_channel_convolution_runs_on_the_space_to_depth_view_on_cpu():
  lhs = jax.random.normal(jax.random.key(0), (4, 12, 12, 1))
  rhs = jax.random.normal(jax.random.key(1), (5, 5, 1, 6))
  fn = jax.jit(lambda l, r: layers.canonical_conv(l, r, (1, 1), 'VALID',
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  text = fn.lower(lhs, rhs).compile().as_text()
  # One convolution of 3x3 blocked taps from 4 to 4 * 6 channels on the 2x2 blocks.
  assert text.count('dim_labels=') == 1
  assert 'f32[3,3,4,24]' in text, text
  want = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(fn(lhs, rhs), want, rtol=1e-5, atol=1e-5)


def test_space_to_depth_is_cpu_only_the_gpu_lowering_keeps_the_convolution():
  # Exported for CUDA on this CPU-only machine: the platform_dependent branches resolve at
  # lowering, so the GPU program holds no blocked kernel, the CPU one does.
  lhs, rhs = jnp.zeros((4, 12, 12, 1)), jnp.zeros((5, 5, 1, 6))
  loss = lambda l, r: jnp.sum(layers.canonical_conv(
      l, r, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2)
  fn = jax.jit(jax.grad(loss, (0, 1)))
  blocked = 'tensor<3x3x4x24xf32>'  # the forward pass's 3x3 taps from 4 to 4 * 6 channels
  gpu = jax.export.export(fn, platforms=['cuda'])(lhs, rhs).mlir_module()
  cpu = jax.export.export(fn, platforms=['cpu'])(lhs, rhs).mlir_module()
  assert blocked not in gpu and blocked in cpu
  assert gpu.count('stablehlo.convolution') == 3  # forward, input and kernel gradients


def test_input_gradient_convolutions_stay_canonical_inside_a_rolled_loop():
  # The cause of rolled attack loops running ~6x slower than their step on XLA:CPU: a
  # swapped-kernel ('01oi') convolution inside a while loop (see layers.canonical_conv).
  model = _model('lenet_like', SHAPES['lenet_like'])
  x = jnp.zeros((4, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)

  def step(xa):
    return xa + 0.01 * jnp.sign(jax.grad(
        lambda z: jnp.sum(model.apply(variables, z, train=False)[:, 0]))(xa))

  text = jax.jit(lambda x0: jax.lax.fori_loop(0, 3, lambda i, xa: step(xa), x0)).lower(
      x).compile().as_text()
  labels = [part.split(',')[0] for part in text.split('dim_labels=')[1:]]
  # Both forward convolutions and conv2's input gradient; conv1's (one input channel) is a
  # matrix product and an overlap-add on CPU (layers.NARROW_INPUT_CHANNELS).
  assert len(labels) >= 3, labels
  assert all(label.endswith('_01io->b01f') for label in labels), labels


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 2)])  # even, and odd (VALID crop)
def test_max_pool_equals_flax_in_values_and_gradients_with_ties(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  x = jnp.where(x > 0.3, 0.3, x)  # many ties: the gradient must go to each window's first max
  weights = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2,
                                                   shape[3]))
  flax_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  loss = lambda pool: (lambda v: jnp.sum(pool(v) * weights))
  np.testing.assert_array_equal(layers.max_pool(x), flax_pool(x))
  got, want = jax.grad(loss(layers.max_pool))(x), jax.grad(loss(flax_pool))(x)
  np.testing.assert_array_equal(got, want)
  assert int(jnp.sum(got != 0)) == weights.size  # one entry per window, never split
  # Under jit and vmap (EOT draws) too.
  batched = jax.jit(jax.vmap(jax.grad(loss(layers.max_pool))))(jnp.stack([x, -x]))
  np.testing.assert_array_equal(batched[1], jax.grad(loss(flax_pool))(-x))


def test_max_pool_keeps_extra_leading_dimensions_like_flax():
  # nn.max_pool accepts [..., H, W, C]; models built with a batch shape of (1, H, W, C) are
  # initialized on a 5-D input, so the custom pool must too.
  x = jax.random.normal(jax.random.key(2), (1, 3, 6, 5, 2))
  want = nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(layers.max_pool(x), want)
  assert layers.max_pool(x).shape == (1, 3, 3, 2, 2)


@pytest.mark.parametrize('name,shape', [('small_cnn', (8, 8, 1)), ('resnet20', (32, 32, 3))])
def test_jitted_init_equals_eager_init_bit_for_bit(name, shape):
  model = models.create_model(name, num_classes=10)
  key = jax.random.key(7)
  params_key, dropout_key = jax.random.split(key)
  eager = model.init({'params': params_key, 'dropout': dropout_key},
                     jnp.zeros((1, *shape), jnp.float32), train=False)
  jitted = models.init_variables(model, key, shape)
  assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(dict(eager))
  for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(dict(eager))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A different key gives different weights (the cached program takes the key as an argument).
  other = models.init_variables(model, jax.random.key(8), shape)
  last_leaf = lambda v: np.asarray(jax.tree_util.tree_leaves(v['params'])[-1])
  assert not np.array_equal(last_leaf(other), last_leaf(jitted))


def test_init_variables_accepts_a_module_with_an_unhashable_field():
  # The jitted init is cached per (model, shape); a list field makes the module unhashable.
  model = models.SmallCNN(num_classes=10, mean=[0.5], std=[0.25])
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
  logits = model.apply(variables, jnp.zeros((2, 8, 8, 1)))
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
