"""Beta-Bernoulli pruning masks (advdef.pruning): the distributions against Monte Carlo and
closed forms, the test-time mask, the masks inside LeNet-5-Caffe, sparsity counts, the
vulnerability metric and the errors of bad placements."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef import config_utils
from advdef import experiment
from advdef import models
from advdef import pruning
from advdef import recipes
from advdef import training

LENET_SHAPE = (28, 28, 1)
LENET_SITES = {'conv1_out': 20, 'conv2_out': 50, 'fc1_in': 800, 'fc2_in': 500}
B_UC_ONE = float(np.log(np.expm1(1.0)))  # softplus(B_UC_ONE) = 1 (B_UC_INIT is 1 - 1.6e-5)


# Jitted, as the library runs them (each eager op would compile on its own).
_ab = jax.jit(pruning.kumaraswamy_ab)
_expected_pi = jax.jit(pruning.expected_pi)
_kl = jax.jit(pruning.kl_divergence)
_test_mask = jax.jit(pruning.test_mask, static_argnames='threshold')


def _uc(value):
  """The unconstrained parameter whose softplus is `value`."""
  return float(np.log(np.expm1(value)))


# (a_uc, b_uc) pairs: b = 1, b = 2.5, b = 0.7, b = 1.5 with a from 0.05 to 2.1.
PAIRS = [(-1.0, B_UC_ONE), (0.5, _uc(2.5)), (2.0, _uc(0.7)), (-3.0, _uc(1.5))]


@functools.partial(jax.jit, static_argnums=2)
def _sample_log_pi(a_uc, b_uc, n, seed):
  keys = jax.random.split(jax.random.key(seed), n)
  return jax.vmap(lambda k: pruning.sample_log_pi(k, a_uc, b_uc))(keys)


def _samples(a_uc, b_uc, n, seed=0):
  return np.asarray(_sample_log_pi(a_uc, b_uc, n, seed), np.float64)  # [n, units]


def _mean_and_se(values):
  return values.mean(0), values.std(0, ddof=1) / np.sqrt(values.shape[0])


def test_kl_closed_form_matches_monte_carlo():
  a_uc = jnp.array([p[0] for p in PAIRS], jnp.float32)
  b_uc = jnp.array([p[1] for p in PAIRS], jnp.float32)
  log_pi = _samples(a_uc, b_uc, 200_000)
  a, b = (np.asarray(v, np.float64) for v in _ab(a_uc, b_uc))
  alpha = pruning.PRIOR_ALPHA
  # log Kumaraswamy(a, b) density and log Beta(alpha, 1) density at pi.
  log_q = np.log(a * b) + (a - 1) * log_pi + (b - 1) * np.log(-np.expm1(a * log_pi))
  log_p = np.log(alpha) + (alpha - 1) * log_pi
  mean, se = _mean_and_se(log_q - log_p)
  kl = np.asarray(_kl(a_uc, b_uc), np.float64)
  assert np.all(se < 0.02), se  # the estimate is informative
  assert np.all(np.abs(kl - mean) < 5 * se + 1e-4), (kl, mean, se)
  # The closed form is not trivially flat: the four pairs have clearly different KLs.
  assert np.ptp(kl) > 1.0
  # kl_total sums the units of every site of a params tree; 0 without masks.
  params = {'a': {pruning.A_PARAM: a_uc, pruning.B_PARAM: b_uc},
            'b': {'c': {pruning.A_PARAM: a_uc[:2], pruning.B_PARAM: b_uc[:2]}},
            'dense': {'kernel': np.ones((3, 2), np.float32)}}
  np.testing.assert_allclose(jax.jit(pruning.kl_total)(params), kl.sum() + kl[:2].sum(),
                             rtol=1e-5)
  assert float(pruning.kl_total({'dense': {'kernel': np.ones((3, 2), np.float32)}})) == 0.0


def test_expected_pi_matches_sample_mean_and_closed_form_for_b_one():
  a_uc = jnp.array([p[0] for p in PAIRS], jnp.float32)
  b_uc = jnp.array([p[1] for p in PAIRS], jnp.float32)
  pi = np.exp(_samples(a_uc, b_uc, 100_000, seed=1))
  mean, se = _mean_and_se(pi)
  e = np.asarray(_expected_pi(a_uc, b_uc), np.float64)
  assert np.all(np.abs(e - mean) < 5 * se), (e, mean, se)
  assert np.ptp(e) > 0.3  # different pairs, different means
  # b = 1: E[pi] = Gamma(1 + 1/a) / Gamma(2 + 1/a) = a / (1 + a).
  a_uc = jnp.array([-20.0, -6.0, -3.0, -1.0, 0.0, 0.5, 2.0], jnp.float32)
  b_uc = jnp.full_like(a_uc, B_UC_ONE)
  a, b = _ab(a_uc, b_uc)
  np.testing.assert_allclose(b, 1.0, rtol=1e-7)
  a = np.asarray(a, np.float64)
  np.testing.assert_allclose(_expected_pi(a_uc, b_uc), a / (1 + a), rtol=0, atol=1e-6)


def test_test_mask_is_expected_pi_above_the_threshold_and_exactly_zero_below():
  # a = softplus(a_uc); b = 1 so E[pi] = a / (1 + a). 1.2e-3 and 0.8e-3 straddle 1e-3.
  above, below = 1.2e-3, 0.8e-3
  a_uc = jnp.array([-20.0, 0.5, _uc(above / (1 - above)), _uc(below / (1 - below)), 3.0, -50.0],
                   jnp.float32)
  b_uc = jnp.full_like(a_uc, B_UC_ONE)
  e = np.asarray(_expected_pi(a_uc, b_uc))
  np.testing.assert_allclose(e[2:4], [above, below], rtol=1e-3)
  mask = np.asarray(_test_mask(a_uc, b_uc))
  kept = np.array([False, True, True, False, True, False])
  np.testing.assert_array_equal(mask[kept], e[kept])
  assert np.all(mask[kept] > 1e-3)
  np.testing.assert_array_equal(mask[~kept], 0.0)
  # A lower threshold keeps the 0.8e-3 unit.
  assert _test_mask(a_uc, b_uc, threshold=5e-4)[3] == e[3]


def test_concrete_masks_are_in_unit_interval_and_average_to_pi():
  pi = np.array([0.05, 0.3, 0.5, 0.7, 0.95], np.float32)
  log_pi = jnp.asarray(np.log(pi))
  batch = 20_000
  concrete = jax.jit(pruning.concrete_mask, static_argnums=2, static_argnames='temperature')
  z = np.asarray(concrete(jax.random.key(3), log_pi, batch))
  assert z.shape == (batch, pi.size) and z.dtype == np.float32
  assert np.all((z >= 0) & (z <= 1))
  # Relaxed Bernoulli at tau = 0.1: P(z > 1/2) = pi exactly, and E[z] is within 0.0014 of
  # pi (numerical integration), so allow 5 standard errors plus 0.002.
  mean, se = _mean_and_se(z.astype(np.float64))
  assert np.all(np.abs(mean - pi) < 5 * se + 2e-3), (mean, pi, se)
  frac, frac_se = _mean_and_se((z > 0.5).astype(np.float64))
  assert np.all(np.abs(frac - pi) < 5 * frac_se + 1e-4), (frac, pi)
  # Mostly near 0 or 1 at this temperature; a higher one is smoother.
  assert np.mean((z > 0.05) & (z < 0.95)) < 0.25
  hot = np.asarray(concrete(jax.random.key(3), log_pi, batch, temperature=5.0))
  assert np.mean((hot > 0.05) & (hot < 0.95)) > 0.9


def _lenet():
  return models.create_model('lenet5_caffe', num_classes=10, normalize='none')


@jax.jit
def _init_masked_lenet(key):
  masked = _lenet().clone(
      hook=pruning.mask_hook(pruning.default_placement('lenet5_caffe'), training=False))
  return masked.init({'params': key}, jnp.zeros((1, *LENET_SHAPE)), train=False)


def _strip_masks(params):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not pruning.is_mask_param(k)})


def _set_masks(params, masks):
  """params with {site: (a_uc, b_uc)} replaced."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for site, (a, b) in masks.items():
    flat[(site, pruning.A_PARAM)] = jnp.asarray(a, jnp.float32)
    flat[(site, pruning.B_PARAM)] = jnp.asarray(b, jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def test_masked_lenet_has_the_authors_placement_and_applies_the_test_masks():
  model = _lenet()
  placement = pruning.default_placement('lenet5_caffe')
  assert pruning.masked_sites(placement, model, LENET_SHAPE) == [
      ('conv1_out', 'conv_out'), ('conv2_out', 'conv_out'), ('fc1_in', 'dense_in'),
      ('fc2_in', 'dense_in')]
  variables = _init_masked_lenet(jax.random.key(0))
  found = pruning.mask_params(variables['params'])
  assert list(found) == list(LENET_SITES)
  for site, (a, b) in found.items():
    assert a.shape == b.shape == (LENET_SITES[site],)
    np.testing.assert_array_equal(a, placement.a_uc_init_dense)  # -1.0 everywhere
    np.testing.assert_array_equal(b, np.float32(pruning.B_UC_INIT))
  # Every other parameter is the plain model's.
  plain_shapes = jax.eval_shape(
      lambda: models.init_variables(model, jax.random.key(0), LENET_SHAPE))['params']
  assert (jax.tree_util.tree_structure(_strip_masks(variables['params']))
          == jax.tree_util.tree_structure(plain_shapes))

  # Random masks, a third of each site's units pruned (a_uc = -20 with b >= 0.97, so
  # E[pi] <= Gamma(1 + b) a^b < 1e-4; a smaller b would keep such a unit).
  rng = np.random.default_rng(0)
  masks = {}
  for site, n in LENET_SITES.items():
    a = rng.uniform(-2, 3, n)
    a[rng.permutation(n)[:n // 3]] = -20.0
    masks[site] = (a, rng.uniform(0.5, 2, n))
  params = _set_masks(variables['params'], masks)
  masked = _lenet().clone(hook=pruning.mask_hook(placement, training=False))
  capture = _lenet().clone(hook=pruning.mask_hook(placement, training=False,
                                                  capture_features=True))

  @jax.jit
  def forward_all(params, x):
    test_masks = {site: pruning.test_mask(a, b)
                  for site, (a, b) in pruning.mask_params(params).items()}

    def manual(site, h):  # the plain model with h * mask at the four sites, by hand
      if site.site_name in test_masks:
        m = test_masks[site.site_name]
        return h * m.reshape((1,) * (h.ndim - 1) + m.shape)
      return models.plain_hook(site, h)

    plain = {'params': _strip_masks(params)}
    _, state = capture.apply({'params': params}, x, train=False, mutable=['intermediates'])
    return (test_masks, masked.apply({'params': params}, x, train=False),
            _lenet().clone(hook=manual).apply(plain, x), _lenet().apply(plain, x),
            pruning.latent_features(state['intermediates'])[-1])

  x = np.random.default_rng(1).uniform(size=(4, *LENET_SHAPE)).astype(np.float32)
  test_masks, logits, expected, unmasked, fc2_input = jax.tree_util.tree_map(
      np.asarray, forward_all(params, x))
  assert np.sum(test_masks['fc1_in'] == 0) == 800 // 3
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits, unmasked, atol=1e-3)

  # A pruned input unit of fc2 no longer reaches the logits; a kept one does. Both are
  # chosen where the fc2 input (act3's output, captured before the fc2_in mask) is non-zero.
  apply = jax.jit(lambda p, x: masked.apply({'params': p}, x, train=False))
  base = apply(params, x)
  np.testing.assert_allclose(base, logits, rtol=1e-6, atol=1e-7)
  assert fc2_input.shape == (4, 500)
  live = np.max(fc2_input, axis=0) > 1e-3
  pruned_unit = int(np.flatnonzero(live & (test_masks['fc2_in'] == 0))[0])
  kept_unit = int(np.flatnonzero(live & (test_masks['fc2_in'] > 0.1))[0])

  def perturb_row(unit):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    kernel = np.array(flat[('fc2', 'kernel')])
    kernel[unit] += 100.0
    flat[('fc2', 'kernel')] = jnp.asarray(kernel)
    return apply(flax.traverse_util.unflatten_dict(flat), x)

  np.testing.assert_array_equal(perturb_row(pruned_unit), base)
  assert np.max(np.abs(perturb_row(kept_unit) - base)) > 1e-2


def _train_logits(model, variables, x, key):
  return model.apply(variables, x, train=True, rngs={'defense': key})


def test_training_masks_are_sampled_per_example_and_per_key_eval_masks_are_fixed():
  variables = _init_masked_lenet(jax.random.key(0))
  # Units near E[pi] = 0.5 so that samples vary a lot.
  masks = {site: (np.full(n, 0.5), np.full(n, B_UC_ONE)) for site, n in LENET_SITES.items()}
  variables = {'params': _set_masks(variables['params'], masks)}
  placement = pruning.default_placement('lenet5_caffe')
  train_model = _lenet().clone(hook=pruning.mask_hook(placement, training=True))
  eval_model = _lenet().clone(hook=pruning.mask_hook(placement, training=False))
  assert pruning.mask_hook(placement, training=True).stochastic
  assert not pruning.mask_hook(placement, training=False).stochastic
  x = np.repeat(np.random.default_rng(1).uniform(size=(1, *LENET_SHAPE)), 4, axis=0).astype(
      np.float32)  # one image, four times
  train = jax.jit(lambda k: _train_logits(train_model, variables, x, k))
  a, b = train(jax.random.key(2)), train(jax.random.key(3))
  for i in range(4):  # every example has its own mask
    for j in range(i):
      assert np.max(np.abs(a[i] - a[j])) > 1e-4
  assert np.max(np.abs(a - b)) > 1e-4  # another key, other masks
  np.testing.assert_array_equal(train(jax.random.key(2)), a)  # same key, same masks
  # Eval mode: deterministic, without a key, identical rows.
  evaluate = jax.jit(lambda v, x: eval_model.apply(v, x, train=False))
  e1, e2 = evaluate(variables, x), evaluate(variables, x)
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_array_equal(e1, np.repeat(e1[:1], 4, axis=0))
  assert np.max(np.abs(a - e1)) > 1e-4


def test_sparsity_summary_counts_pruned_units_exactly():
  def site(n, pruned):
    a = np.full(n, 0.5, np.float32)
    a[pruned] = -20.0
    return {pruning.A_PARAM: a, pruning.B_PARAM: np.full(n, pruning.B_UC_INIT, np.float32)}

  params = {'conv1_out': site(20, [0, 5, 19]),
            'block': {'fc1_in': site(800, list(range(0, 800, 2)))},  # nested site name
            'fc2_in': site(20, []),
            'fc2': {'kernel': np.ones((20, 10), np.float32), 'bias': np.zeros(10, np.float32)}}
  s = pruning.sparsity_summary(params)
  assert s['units'] == {'conv1_out': 20, 'block/fc1_in': 800, 'fc2_in': 20}
  assert s['active_units'] == {'conv1_out': 17, 'block/fc1_in': 400, 'fc2_in': 20}
  assert s['sparsity_percent'] == pytest.approx(100 - 100 * (17 + 400 + 20) / 840, abs=1e-12)
  # No masks: nothing to count.
  empty = pruning.sparsity_summary({'fc2': {'kernel': np.ones((3, 2), np.float32)}})
  assert empty == {'units': {}, 'active_units': {}, 'sparsity_percent': 0.0}
  # Every unit pruned.
  assert pruning.sparsity_summary({'s': site(20, range(20))})['sparsity_percent'] == 100.0


def _anp_config(recipe, model='small_cnn'):
  c = config_utils.base_config()
  c.model.name = model
  c.train.recipe = recipe
  c.report.tensorboard = False
  return c


def test_placement_errors_name_the_field_and_the_valid_sites(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match='mask_sites'):
    pruning.placement_from('small_cnn')
  with pytest.raises(ValueError, match='mask_sites'):
    pruning.placement_from('small_cnn', mask_sites=[])
  placement = pruning.placement_from('small_cnn', mask_sites='fc*_in', a_uc_init_dense=3)
  assert placement == pruning.Placement(('fc*_in',), -1.0, 3.0)
  model = models.create_model('small_cnn', num_classes=10)
  assert pruning.masked_sites(placement, model, (8, 8, 1)) == [('fc1_in', 'dense_in'),
                                                               ('fc2_in', 'dense_in')]
  with pytest.raises(ValueError, match='train.recipe') as e:
    pruning.masked_sites(pruning.Placement(('fc1_in', 'nope*')), model, (8, 8, 1))
  assert "'nope*'" in str(e.value)
  for valid in ('conv1_out', 'conv2_out', 'fc1_in', 'fc2_in'):
    assert valid in str(e.value)
  # act and conv_in sites cannot hold masks.
  with pytest.raises(ValueError, match='train.recipe'):
    pruning.masked_sites(pruning.Placement(('act1',)), model, (8, 8, 1))

  # Through the experiment: refused before any training compute.
  def no_training(*args, **kwargs):
    raise AssertionError('training started')
  monkeypatch.setattr(training, 'train_and_evaluate', no_training)
  config = _anp_config('anp(beta=4, lam=0.001, eps=0.3)')
  with pytest.raises(ValueError, match='mask_sites'):
    experiment.prepare(config)
  with pytest.raises(ValueError, match='mask_sites'):
    experiment.run(config, str(tmp_path / 'run'), progress=False)
  assert not (tmp_path / 'run').exists()
  config = _anp_config('anp(beta=4, lam=0.001, eps=0.3, mask_sites=nope)')
  with pytest.raises(ValueError, match='train.recipe.*nope.*valid sites: .*fc1_in'):
    experiment.prepare(config)
  config = _anp_config('bp(beta=4)', model='lenet_like')
  with pytest.raises(ValueError, match='mask_sites'):
    experiment.prepare(config)


@pytest.mark.parametrize('spec,field', [
    ('anp(beta=-1, lam=0.001, eps=0.3)', 'beta'),
    ('anp(beta=4, lam=-1, eps=0.3)', 'lam'),
    ('bp(beta=-0.5)', 'beta'),
    ('anp(beta=4, lam=0.001, eps=0.3, mask_lr_scale=0)', 'mask_lr_scale'),
    ('anp(beta=4, lam=0.001, eps=0.3, kl_examples=1.5)', 'kl_examples'),
    ('anp(beta=4, lam=0.001)', 'eps'),
    ('anp(lam=0.001, eps=0.3)', 'beta'),
])
def test_bad_anp_hyperparameters_name_the_field(spec, field):
  with pytest.raises(ValueError, match='train.recipe') as e:
    recipes.parse_recipe(spec)
  assert field in str(e.value)
  config = _anp_config(spec, model='lenet5_caffe')
  with pytest.raises(ValueError, match=field):
    experiment.validate_config(config)


def test_vulnerability_is_the_mean_over_layers_of_mean_absolute_differences():
  clean = [jnp.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]]), jnp.array([0.5, 0.5])]
  adv = [jnp.array([[1.5, 2.0, 1.0], [0.0, 1.0, 4.0]]), jnp.array([0.0, 2.5])]
  # layer 1: (0.5 + 0 + 2 + 0 + 2 + 0) / 6 = 0.75; layer 2: (0.5 + 2) / 2 = 1.25.
  assert float(pruning.vulnerability(clean, adv)) == pytest.approx((0.75 + 1.25) / 2)
  assert float(pruning.vulnerability(clean, clean)) == 0.0
  assert float(pruning.vulnerability(clean[:1], adv[:1])) == pytest.approx(0.75)
  with pytest.raises(ValueError):
    pruning.vulnerability([], [])


def test_latent_features_are_the_activations_in_call_order():
  model = models.create_model('small_cnn', num_classes=10)
  variables = jax.jit(lambda k: models.init_variables(model, k, (8, 8, 1)))(jax.random.key(0))
  capture = model.clone(hook=pruning.mask_hook(None, training=False, capture_features=True))
  assert pruning.mask_hook(None, training=False) is None
  x = np.random.default_rng(1).uniform(size=(2, 8, 8, 1)).astype(np.float32)

  @jax.jit
  def both(variables, x):
    logits, state = capture.apply(variables, x, train=False, mutable=['intermediates'])
    return logits, state, model.apply(variables, x)

  logits, state, plain = both(variables, x)
  np.testing.assert_array_equal(logits, plain)  # capturing changes nothing
  feats = pruning.latent_features(state['intermediates'])
  assert [f.shape for f in feats] == [(2, 8, 8, 32), (2, 8, 8, 64), (2, 128)]
  assert all(np.min(f) >= 0 for f in feats)  # post-ReLU


@pytest.mark.parametrize('field,value,message', [
    ('attack', 'pgdd(steps=3)', 'eval.vulnerability.attack'),           # unknown attack
    ('attack', 'pgd(stepz=3)', "eval.vulnerability.attack='pgd(stepz=3)'"),  # bad argument
    ('attack', 'pgd(steps=0)', 'steps'),                                  # bad value
    ('epsilon', 1.5, 'eval.vulnerability.epsilon'),
    ('num_examples', -1, 'eval.vulnerability.num_examples'),
    ('source', '/nonexistent/run', 'eval.vulnerability.source'),
])
def test_bad_vulnerability_config_fails_before_compute(field, value, message):
  c = config_utils.base_config()
  c.eval.vulnerability.update(attack='pgd(steps=3)', epsilon=0.3)
  c.eval.vulnerability[field] = value
  with pytest.raises(ValueError) as e:
    experiment.validate_config(c)
  assert message in str(e.value), str(e.value)
