"""Retrofitting defenses onto registry models through their sites."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import defenses
from advdef import models
from advdef import retrofit


def _setup(name='small_cnn', shape=(8, 8, 1)):
  model = models.create_model(name, num_classes=10, mean=(0.5,) * shape[-1],
                              std=(0.25,) * shape[-1])
  variables = models.init_variables(model, jax.random.key(0), shape)
  x = jax.random.uniform(jax.random.key(1), (4, *shape))
  return model, variables, x


def test_none_is_the_plain_model_bit_for_bit():
  model, variables, x = _setup()
  assert retrofit.build_hook('none') is None
  logits_fn = retrofit.make_logits_fn(model, variables, retrofit.build_hook('none'))
  np.testing.assert_array_equal(logits_fn(x, jax.random.key(5)), model.apply(variables, x))


@pytest.mark.parametrize('name,shape', [('small_cnn', (8, 8, 1)), ('lenet_like', (28, 28, 1)),
                                        ('lenet5_caffe', (28, 28, 1)), ('resnet20', (32, 32, 3)),
                                        ('resnet20_postact', (32, 32, 3)), ('vgg16', (32, 32, 3))])
@pytest.mark.parametrize('spec', ['sap(frac=1.0)', 'sap(frac=0.5, placement=conv)',
                                  'jump(kappa=0.1)', 'rse(sigma_init=0.2, sigma_inner=0.1)',
                                  'rse(sigma_init=0.1, sigma_inner=0.05) + jump(kappa=0.05)'])
def test_every_defense_applies_to_every_model(name, shape, spec):
  model, variables, x = _setup(name, shape)
  retrofit.validate_for_model(spec, model, shape)
  hook = retrofit.build_hook(spec)
  logits_fn = jax.jit(retrofit.make_logits_fn(model, variables, hook))
  a, b = logits_fn(x, jax.random.key(1)), logits_fn(x, jax.random.key(2))
  assert a.shape == (4, 10) and bool(jnp.all(jnp.isfinite(a)))
  plain = model.apply(variables, x)
  assert not np.allclose(a, plain)  # the defense acts
  if hook.stochastic:
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, logits_fn(x, jax.random.key(1)))  # same key, same draw
  else:
    np.testing.assert_array_equal(a, b)


def test_retrofit_leaves_parameters_unchanged():
  model, variables, x = _setup()
  before = jax.tree_util.tree_map(np.asarray, variables)
  hook = retrofit.build_hook('sap(frac=1.0) + rse(sigma_init=0.1, sigma_inner=0.1)')
  defended = model.clone(hook=hook)
  new_vars = defended.init({'params': jax.random.key(0), 'defense': jax.random.key(1)},
                           x, train=False)
  assert jax.tree_util.tree_structure(new_vars) == jax.tree_util.tree_structure(before)
  retrofit.make_logits_fn(model, variables, hook)(x, jax.random.key(3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)


def test_jump_replaces_relu_exactly_and_only_at_inference():
  model, variables, x = _setup()
  kappa = 0.3
  seen = []

  def manual(site, h):
    if site.kind == 'act':
      seen.append(site.site_name)
      return defenses.jump_relu(h, kappa=kappa)
    return h

  expected = model.clone(hook=manual).apply(variables, x)
  got = retrofit.make_logits_fn(model, variables, retrofit.build_hook(f'jump(kappa={kappa})'))(
      x, jax.random.key(0))
  np.testing.assert_array_equal(got, expected)
  assert len(seen) == 3
  assert retrofit.build_hook('jump(kappa=0.3)', training=True) is None  # training keeps ReLU
  assert retrofit.build_hook('rse(sigma_init=0.1, sigma_inner=0.1)', training=True) is not None


def test_sap_placement_relu_vs_conv_sites():
  model, variables, x = _setup('lenet5_caffe', (28, 28, 1))
  for spec, expected in [('sap', ['act1', 'act2', 'act3']),
                         ('sap(placement=conv)', ['conv1_out', 'conv2_out'])]:
    calls = []
    hook = retrofit.build_hook(spec)
    original = hook.transforms[0]

    def recording(key, h, site, fn=original.fn):
      calls.append(site.site_name)
      return fn(key, h, site)

    hook.transforms = (retrofit.SiteTransform(original.name, original.stage, recording,
                                              original.stochastic, original.in_training),)
    retrofit.make_logits_fn(model, variables, hook)(x, jax.random.key(0))
    assert calls == expected


def test_rse_uses_sigma_init_on_the_input_and_sigma_inner_elsewhere():
  model, variables, x = _setup()
  sigmas = {}
  hook = retrofit.build_hook('rse(sigma_init=0.25, sigma_inner=0.5)')
  original = hook.transforms[0].fn

  def spy(key, h, site):
    out = original(key, h, site)
    sigmas[site.site_name] = float(jnp.std(out - h))
    return out

  hook.transforms = (retrofit.SiteTransform('rse', 'conv_in', spy, True, True),)
  model.clone(hook=hook).apply(variables, jnp.zeros((64, 8, 8, 1)), rngs={'defense':
                                                                         jax.random.key(0)})
  assert abs(sigmas['conv1_in'] - 0.25) < 0.02
  assert abs(sigmas['conv2_in'] - 0.5) < 0.02


def test_traced_hyperparameters_vmap_over_a_kappa_grid():
  model, variables, x = _setup()

  def logits_at(kappa):
    hook = retrofit.Retrofit(retrofit.make_transforms([('jump', {'kappa': kappa})]))
    return retrofit.make_logits_fn(model, variables, hook)(x, jax.random.key(0))

  grid = jnp.array([0.0, 0.2, 0.5])
  swept = jax.jit(jax.vmap(logits_at))(grid)
  for i, k in enumerate([0.0, 0.2, 0.5]):
    np.testing.assert_allclose(swept[i], logits_at(k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('spec,match', [
    ('sapp', "unknown defense 'sapp'; valid names: none, sap, jump"),
    ('sap(fraction=1)', "bad arguments for 'sap'"),
    ('sap(placement=dense)', "sap.placement='dense'.*relu, conv"),
    ('jump(kappa=0.5, surrogate=tanh)', 'jump.surrogate'),
])
def test_bad_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    retrofit.build_hook(spec, field='eval.defenses[1]')


def test_site_pattern_that_matches_nothing_lists_valid_sites():
  model, _, _ = _setup()
  with pytest.raises(ValueError, match='matches no act site.*act1, act2, act3'):
    retrofit.validate_for_model('sap(sites=stage9*)', model, (8, 8, 1))


@pytest.mark.parametrize('spec,field', [('sap(frac=0)', 'sap.frac'), ('sap(frac=-1)', 'sap.frac'),
                                        ('jump(kappa=-0.1)', 'jump.kappa'),
                                        ('rse(sigma_init=-1)', 'rse.sigma_init'),
                                        ('rse(sigma_inner=nan)', 'rse.sigma_inner')])
def test_out_of_range_hyperparameters_fail_before_compute(spec, field):
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    retrofit.build_hook(spec)
