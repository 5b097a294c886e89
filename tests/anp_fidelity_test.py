"""ANP-VS fidelity of vgg16_anp against the authors' code (divyam3897/ANP_VS, src/model/vgg.py;
../shared/reference/papers.md sections 2.2, 2.3, 2.5): no head dropout in their 'bbd' mode (ANP,
ANP-VS, BP), while the conv dropouts stay on; the VS term's 15 latent features, fc1's output
before BatchNorm among them; masks only where the authors put them. LeNet-5-Caffe keeps its 3
features, and every config training ANP/BP on vgg16_anp turns the head dropout off."""

import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import models
from advdef import pruning
from advdef import recipes

SHAPE = (32, 32, 3)
TESTS = pathlib.Path(__file__).resolve().parent
ACT_AND_LATENT = [f'act{i}' for i in range(1, 14)] + ['fc1_out', 'act14']


def _vgg(**kw):
  return models.create_model('vgg16_anp', num_classes=10, **kw)


def _variables(model, shape, seed=0):
  """Random variables of the model's shapes, drawn with NumPy (a jitted init of VGG-16 is
  slow on a busy CPU): kernels ~ N(0, 1/fan_in), BN scales near 1, running stats (0, 1)."""
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1]
    if name == 'mean':
      return np.zeros(leaf.shape, np.float32)
    if name == 'var':
      return np.ones(leaf.shape, np.float32)
    if name == 'scale':
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  return flax.traverse_util.unflatten_dict({k: draw(k, v) for k, v in flat.items()})


def _images(seed=1):
  return np.random.default_rng(seed).uniform(size=(2, *SHAPE)).astype(np.float32)


def _capturing(model, train):
  return model.clone(hook=pruning.mask_hook(None, training=train, capture_features=True))


def _head_by_hand(params, feats):
  """fc1 on the pooled, flattened act13 (no head dropout), and fc2 on act14."""
  act13 = np.asarray(feats[12])
  assert act13.shape[1:3] == (2, 2)  # the last 2x2 max pool leaves 1x1
  pooled = np.max(act13, axis=(1, 2))
  fc1 = pooled @ params['fc1']['kernel'] + params['fc1']['bias']
  logits = np.asarray(feats[14]) @ params['fc2']['kernel'] + params['fc2']['bias']
  return fc1, logits


def test_head_dropout_is_off_with_rate_zero_and_on_with_half():
  """Training mode: with head_dropout=0 fc1 and fc2 see exactly the activations before them
  (no head dropout), while the conv dropouts still make the output depend on the key; with
  0.5 both head dropouts act."""
  x = _images()
  variables = None
  for rate in (0.0, 0.5):
    model = _vgg(width_divisor=8, head_dropout=rate)
    if variables is None:
      variables = _variables(model, SHAPE)
    capture = _capturing(model, train=True)

    @jax.jit
    def train_forward(variables, x, key, capture=capture):
      logits, state = capture.apply(variables, x, train=True, rngs={'dropout': key},
                                    mutable=['intermediates', 'batch_stats'])
      return logits, pruning.latent_features(state['intermediates'])

    # RBG keys: the dropout masks' bits compile about twice as fast as threefry's on CPU.
    logits, feats = jax.tree_util.tree_map(
        np.asarray, train_forward(variables, x, jax.random.key(1, impl='rbg')))
    logits2, feats2 = jax.tree_util.tree_map(
        np.asarray, train_forward(variables, x, jax.random.key(2, impl='rbg')))
    fc1, fc2 = _head_by_hand(variables['params'], feats)
    if rate == 0.0:
      np.testing.assert_allclose(feats[13], fc1, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(logits, fc2, rtol=1e-5, atol=1e-5)
    else:
      assert not np.allclose(feats[13], fc1, atol=1e-3)  # dropout before fc1
      assert not np.allclose(logits, fc2, atol=1e-3)     # dropout before fc2
    # The conv dropouts (0.3 / 0.4) are on whatever the head's rate.
    assert not np.allclose(feats[12], feats2[12])
    assert not np.allclose(logits, logits2)


def test_head_dropout_rate_is_checked():
  with pytest.raises(ValueError, match='model.head_dropout'):
    model = _vgg(width_divisor=8, head_dropout=1.0)
    jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SHAPE))


def test_vgg16_anp_has_the_authors_15_latent_features_in_order():
  """13 post-BN-ReLU conv activations, fc1's output before BN, then after BN + ReLU
  (papers.md 2.2), at the paper's widths; masks stay at the authors' 15 places (2.3). In
  eval mode the head dropout rate changes nothing."""
  model = _vgg(head_dropout=0.0)
  names = [n for n, k in models.list_sites(model, SHAPE) if k in ('act', 'latent')]
  assert names == ACT_AND_LATENT
  variables = _variables(model, SHAPE)
  capture = _capturing(model, train=False)

  @jax.jit
  def forward(variables, x):
    logits, state = capture.apply(variables, x, train=False, mutable=['intermediates'])
    return logits, pruning.latent_features(state['intermediates']), _vgg().apply(variables, x)

  logits, feats, plain = jax.tree_util.tree_map(np.asarray, forward(variables, _images()))
  np.testing.assert_array_equal(logits, plain)  # neither capture nor head_dropout matters
  widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  sides = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
  assert [f.shape for f in feats] == (
      [(2, s, s, w) for s, w in zip(sides, widths)] + [(2, 512), (2, 512)])
  assert all(np.min(f) >= 0 for i, f in enumerate(feats) if i != 13)  # post-ReLU
  assert np.min(feats[13]) < 0                                         # before BN and ReLU
  params, stats = variables['params'], variables['batch_stats']
  fc1, _ = _head_by_hand(params, feats)
  np.testing.assert_allclose(feats[13], fc1, rtol=1e-5, atol=1e-5)
  bn = (feats[13] - stats['bn14']['mean']) / np.sqrt(stats['bn14']['var'] + 1e-3)
  np.testing.assert_allclose(
      feats[14], np.maximum(bn * params['bn14']['scale'] + params['bn14']['bias'], 0),
      rtol=1e-5, atol=1e-5)
  # The vulnerability averages over the 15 layers.
  shifted = [f + i for i, f in enumerate(feats)]
  assert float(pruning.vulnerability(feats, shifted)) == pytest.approx(7.0)

  # Masks: the 13 conv outputs and the inputs of fc1 and fc2, never the new 'latent' site.
  placement = pruning.default_placement('vgg16_anp')
  masked = [f'conv{i}_out' for i in range(1, 14)] + ['fc1_in', 'fc2_in']
  assert [n for n, _ in pruning.masked_sites(placement, model, SHAPE)] == masked
  hook = pruning.mask_hook(placement, training=True, capture_features=True)
  shapes = jax.eval_shape(lambda: models.init_variables(model.clone(hook=hook),
                                                        jax.random.key(0), SHAPE))
  assert sorted(pruning.mask_params(shapes['params'])) == sorted(masked)
  assert recipes.parse_recipe('anp(beta=2, lam=1e-4, eps=0.03)').placement('vgg16_anp') == \
      placement


def test_lenet5_caffe_keeps_its_3_features_and_no_other_model_has_a_latent_site():
  """The authors' LeNet temp_x: conv1, conv2 and dense3 after ReLU (papers.md 2.2)."""
  model = models.create_model('lenet5_caffe', num_classes=10)
  shape = (28, 28, 1)
  variables = _variables(model, shape)
  capture = _capturing(model, train=False)
  x = np.random.default_rng(1).uniform(size=(2, *shape)).astype(np.float32)
  feats = jax.jit(lambda v, x: pruning.latent_features(
      capture.apply(v, x, train=False, mutable=['intermediates'])[1]['intermediates']))(
          variables, x)
  assert len(feats) == 3
  assert [f.shape for f in feats] == [(2, 24, 24, 20), (2, 8, 8, 50), (2, 500)]
  for name, shape in [('lenet5_caffe', (28, 28, 1)), ('lenet_like', (28, 28, 1)),
                      ('small_cnn', (8, 8, 1)), ('resnet20', SHAPE), ('vgg16', SHAPE)]:
    kinds = [k for _, k in models.list_sites(
        models.create_model(name, num_classes=10), shape)]
    assert 'latent' not in kinds, name


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configs_training_anp_or_bp_on_vgg16_anp_turn_the_head_dropout_off():
  """The authors' bbd mode has no head dropout (papers.md 2.5): every config variant (those
  tests/configs_test.py loads) that trains a masks recipe on vgg16_anp sets head_dropout=0."""
  variants = _load(TESTS / 'configs_test.py').VARIANTS
  config_dir = TESTS.parent / 'configs'
  mentioning = {p.name for p in config_dir.glob('*.py') if 'vgg16_anp' in p.read_text()}
  using = set()
  for name, args in variants.items():
    for arg in args:
      config = _load(config_dir / name).get_config(arg)
      if config.model.name != 'vgg16_anp':
        continue
      using.add(name)
      if recipes.parse_recipe(config.train.recipe).uses_masks:
        assert dict(config.model.kwargs).get('head_dropout') == 0.0, (name, arg)
  assert mentioning <= using  # a config naming vgg16_anp is checked in some variant


@pytest.mark.parametrize('recipe', ['anp(beta=1.0, lam=0.01, eps=0.03, step_size=0.007)',
                                    'bp(beta=1.0)'])
def test_mask_recipes_on_vgg16_anp_refuse_the_head_dropout(recipe):
  from advdef import config_utils
  from advdef import experiment
  c = config_utils.base_config()
  c.data.update(source='fake', name='cifar10_shaped', fake_shape=(32, 32, 3))
  c.model.name, c.train.recipe = 'vgg16_anp', recipe
  with pytest.raises(ValueError, match=r'model\.kwargs\.head_dropout=0\.0 \(got 0\.5\)'):
    experiment.validate_config(c)
  c.model.kwargs.head_dropout = 0.0
  experiment.validate_config(c)  # accepted
