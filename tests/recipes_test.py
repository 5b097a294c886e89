"""Training recipes (advdef.recipes): spec validation, every recipe end to end, the epoch
snapshot of fgsm_mix(source=previous_epoch), ANP's two objectives, the two-group optimizer,
and adversarial training's robustness gain over standard training."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import experiment
from advdef import runs
from advdef import models
from advdef import pruning
from advdef import recipes
from advdef import training

LENET_SITES = {'conv1_out': 20, 'conv2_out': 50, 'fc1_in': 800, 'fc2_in': 500}


# ---------------------------------------------------------------------------------------
# parse_recipe
# ---------------------------------------------------------------------------------------


def test_valid_specs_fill_in_the_defaults():
  r = recipes.parse_recipe('standard')
  assert (r.name, r.hparams) == ('standard', {})
  assert not (r.adversarial or r.uses_masks or r.needs_snapshot)
  assert r.placement('small_cnn') is None

  r = recipes.parse_recipe('pgd_at(eps=0.1)')
  assert r.hparams == dict(eps=0.1, step_size=None, steps=10, clean_weight=0.0, adv_weight=1.0,
                           random_start=True, eps_warmup=0.0)
  assert r.adversarial and not r.uses_masks

  r = recipes.parse_recipe('fgsm_mix(eps=0.1, fraction=0.2, source=previous_epoch)')
  assert r.hparams == dict(eps=0.1, fraction=0.2, source='previous_epoch')
  assert r.needs_snapshot
  assert not recipes.parse_recipe('fgsm_mix(eps=0.1, fraction=0.2)').needs_snapshot

  r = recipes.parse_recipe('trades(eps=0.3)')
  assert r.hparams == dict(eps=0.3, step_size=None, steps=10, beta=6.0, eps_warmup=0.0)

  r = recipes.parse_recipe('anp(beta=4, lam=0.001, eps=0.3)')
  assert r.hparams == dict(beta=4, lam=0.001, eps=0.3, step_size=None, steps=20,
                           adv_weight=2.0, mask_lr_scale=10.0, kl_examples=0, eps_warmup=0.0,
                           mask_sites=None, a_uc_init_conv=None, a_uc_init_dense=None)
  assert r.adversarial and r.uses_masks
  assert r.placement('lenet5_caffe') == pruning.DEFAULT_PLACEMENTS['lenet5_caffe']

  r = recipes.parse_recipe("bp(beta=4, mask_sites=['fc1_in', 'fc2_in'], a_uc_init_dense=2)")
  assert r.hparams['mask_lr_scale'] == 10.0 and r.uses_masks and not r.adversarial
  assert r.placement('small_cnn') == pruning.Placement(('fc1_in', 'fc2_in'), -1.0, 2.0)
  # Zero is allowed where the docstring says so.
  recipes.parse_recipe('anp(beta=0, lam=0, eps=0.3, adv_weight=0)')
  recipes.parse_recipe('pgd_at(eps=0.1, clean_weight=1, adv_weight=0)')


@pytest.mark.parametrize('spec,argument', [
    ('sgd_at(eps=0.1)', 'sgd_at'),                                   # unknown recipe
    ('standard + pgd_at(eps=0.1)', 'exactly one'),                   # two recipes
    ('standard(eps=0.1)', 'eps'),                                    # standard takes none
    ('pgd_at(eps=0.1, epsilon=0.2)', 'epsilon'),                     # unknown argument
    ('trades(eps=0.1, alpha=1)', 'alpha'),
    ('pgd_at', 'eps'),                                               # missing eps
    ('pgd_at(steps=3)', 'eps'),
    ('fgsm_mix(eps=0.1)', 'fraction'),
    ('anp(beta=4, eps=0.3)', 'lam'),
    ('pgd_at(eps=1.5)', 'eps'),                                      # eps > 1
    ('trades(eps=8)', 'eps'),
    ('anp(beta=4, lam=0, eps=255)', 'eps'),
    ('pgd_at(eps=0)', 'eps'),
    ('pgd_at(eps=-0.1)', 'eps'),
    ('fgsm_mix(eps=0.1, fraction=1.5)', 'fraction'),                 # fraction > 1
    ('fgsm_mix(eps=0.1, fraction=-0.5)', 'fraction'),
    ('pgd_at(eps=0.1, clean_weight=-1)', 'clean_weight'),            # negative weights
    ('pgd_at(eps=0.1, adv_weight=-1)', 'adv_weight'),
    ('pgd_at(eps=0.1, clean_weight=0, adv_weight=0)', 'clean_weight + adv_weight'),
    ('anp(beta=4, lam=0, eps=0.3, adv_weight=-2)', 'adv_weight'),
    ('trades(eps=0.1, beta=-6)', 'beta'),
    ('fgsm_mix(eps=0.1, fraction=0.5, source=bad)', 'source'),
    ('pgd_at(eps=0.1, steps=0)', 'steps'),
    ('pgd_at(eps=0.1, steps=2.5)', 'steps'),
    ('pgd_at(eps=0.1, step_size=-0.01)', 'step_size'),
    ('pgd_at(eps=0.1, random_start=yes)', 'random_start'),
    ('bp(beta=4, mask_lr_scale=-1)', 'mask_lr_scale'),
    ('pgd_at(eps=0.1, eps_warmup=1.0)', 'eps_warmup'),                # a fraction < 1
    ('anp(beta=4, lam=0, eps=0.3, eps_warmup=-0.1)', 'eps_warmup'),
    ('fgsm_mix(eps=0.1, fraction=0.5, eps_warmup=0.5)', 'eps_warmup'),  # one-step: none
    ('pgd_at(eps=0.1', 'pgd_at'),                                    # malformed
])
def test_bad_specs_raise_naming_the_field_and_the_argument(spec, argument):
  with pytest.raises(ValueError) as e:
    recipes.parse_recipe(spec)
  message = str(e.value)
  assert 'train.recipe' in message and argument in message, message


def test_validate_config_rejects_a_bad_recipe_before_compute():
  c = config_utils.base_config()
  c.train.recipe = 'fgsm_mix(eps=0.1, fraction=0.5, source=bad)'
  with pytest.raises(ValueError, match=r'train\.recipe.*source'):
    experiment.validate_config(c)


# ---------------------------------------------------------------------------------------
# Every recipe, end to end.
# ---------------------------------------------------------------------------------------

_BASE_METRICS = {'loss'}
E2E = [
    ('standard', False, {'accuracy'}),
    ('pgd_at(eps=0.1, steps=2)', False, {'adv_accuracy'}),
    ('fgsm_mix(eps=0.1, fraction=0.5)', False, {'accuracy'}),
    ('fgsm_mix(eps=0.1, fraction=0.2, source=previous_epoch)', False, {'accuracy'}),
    ('trades(eps=0.1, steps=2)', False, {'accuracy', 'adv_accuracy', 'kl_robust'}),
    ('anp(beta=4, lam=0.001, eps=0.3, steps=2)', True,
     {'mask_loss', 'accuracy', 'adv_accuracy', 'kl', 'vulnerability'}),
    ('bp(beta=4)', True, {'mask_loss', 'accuracy', 'kl'}),
]


def _e2e_config(recipe, lenet):
  c = config_utils.base_config()
  c.train.update(num_epochs=1, batch_size=32, recipe=recipe, log_every_steps=1)
  c.eval.update(num_examples=32, batch_size=32, checks=False)
  c.report.tensorboard = False
  c.parallel.num_devices = 1
  if lenet:  # the authors' network, on fake MNIST-shaped data
    c.model.update(name='lenet5_caffe', normalize='none')
    c.data.update(source='fake', name='mnist_shaped', fake_shape=(28, 28, 1),
                  fake_num_train=64, fake_num_test=32)
    c.train.update(optimizer='adam', learning_rate=1e-3)
  else:  # digits (8x8x1), small_cnn
    c.data.update(num_train=64, num_test=32)
  return c


@pytest.mark.parametrize('recipe,lenet,metrics', E2E, ids=[r for r, _, _ in E2E])
def test_every_recipe_trains_end_to_end(tmp_path, recipe, lenet, metrics):
  report = experiment.run(_e2e_config(recipe, lenet), str(tmp_path), progress=False)
  train = report['training']['final_train']
  assert set(train) == _BASE_METRICS | metrics
  assert all(math.isfinite(v) for v in train.values()), train
  assert report['training']['steps'] == 2
  assert 0 <= report['training']['final_test']['accuracy'] <= 1
  summary = report['model_summary']
  on_disk = json.loads((tmp_path / 'report.json').read_text())
  assert on_disk['model_summary']['sparsity_percent'] == summary['sparsity_percent']
  if not lenet:
    assert summary['sparsity_percent'] == 0.0
    assert 'units' not in summary and 'pruned_export' not in summary
    return
  assert summary['units'] == LENET_SITES
  assert 0.0 <= summary['sparsity_percent'] <= 100.0
  assert summary['pruned_export']['max_abs_logit_difference'] < 1e-3
  assert (tmp_path / 'pruned_model.npz').exists()
  # The masks were trained (every unit starts at a_uc = -1) and the checkpoint holds them.
  run = runs.load_run(str(tmp_path))
  masks = pruning.mask_params(run.variables['params'])
  assert list(masks) == list(LENET_SITES)
  assert all(np.any(np.asarray(a) != -1.0) for a, _ in masks.values())
  # Both losses are cross-entropies (+ lam V) plus beta KL / N with N = the 64 training
  # examples: the KL term is ~600 here, the rest a few nats.
  kl_term = 4 * train['kl'] / 64
  assert kl_term > 100
  assert 0 < train['loss'] - kl_term < 10 and 0 < train['mask_loss'] - kl_term < 10


# ---------------------------------------------------------------------------------------
# fgsm_mix(source=previous_epoch): the snapshot of the epoch's first parameters.
# ---------------------------------------------------------------------------------------


def _tiny_data(n=16, shape=(8, 8, 1), seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *shape)).astype(np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return images, labels


def _copy(tree):
  return jax.tree_util.tree_map(np.array, tree)  # host copies: the state is donated


def _assert_trees_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _run_steps(recipe, n_steps, spe=2, batch=8):
  model = models.create_model('small_cnn', num_classes=10, mean=(0.5,), std=(0.25,))
  tx = optax.sgd(0.5)
  parsed = recipes.parse_recipe(recipe)
  state = jax.jit(lambda k: training.create_train_state(
      k, model, tx, (8, 8, 1), snapshot=parsed.needs_snapshot))(jax.random.key(0))
  step_fn = training.make_train_step(model, tx, training.StepConfig(
      batch_size=batch, steps_per_epoch=spe, recipe=parsed, num_train=batch * spe))
  images, labels = _tiny_data(batch * spe)
  perm = jnp.arange(batch * spe, dtype=jnp.int32)
  params, snapshots = [_copy(state.params)], [_copy(state.snapshot)]
  for _ in range(n_steps):
    state, _ = step_fn(state, images, labels, perm, jax.random.key(1))
    params.append(_copy(state.params))
    snapshots.append(_copy(state.snapshot))
  return params, snapshots


def test_previous_epoch_snapshot_holds_the_parameters_at_the_start_of_the_epoch():
  params, snapshots = _run_steps('fgsm_mix(eps=0.1, fraction=0.5, source=previous_epoch)', 3)
  # params[i]: after i steps. Epochs of 2 steps: steps 0-1 see params[0], step 2 params[2].
  _assert_trees_equal(snapshots[0]['params'], params[0])  # create_train_state's copy
  _assert_trees_equal(snapshots[1]['params'], params[0])
  _assert_trees_equal(snapshots[2]['params'], params[0])
  _assert_trees_equal(snapshots[3]['params'], params[2])
  assert not np.allclose(params[2]['fc2']['kernel'], params[0]['fc2']['kernel'])
  assert snapshots[3]['batch_stats'] == {}  # small_cnn has none

  # The attack uses the snapshot: with source=current, the first step (where snapshot and
  # current parameters coincide) is the same; the second (where they differ) is not.
  current, no_snapshot = _run_steps('fgsm_mix(eps=0.1, fraction=0.5)', 2)
  assert no_snapshot[-1] == {}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         current[1], params[1])
  assert not np.allclose(current[2]['fc2']['kernel'], params[2]['fc2']['kernel'], rtol=1e-5,
                         atol=1e-6)


# ---------------------------------------------------------------------------------------
# ANP: masks and weights follow their own objectives.
# ---------------------------------------------------------------------------------------

_N_TRAIN = 50


def _toy_net(p, x):
  """Logits and features of a two-layer net with a deterministic (E[pi]) mask on its input."""
  h = x.reshape((x.shape[0], -1)) * pruning.expected_pi(p['site']['bb_a_uc'],
                                                        p['site']['bb_b_uc'])[None, :]
  hidden = jax.nn.relu(h @ p['w1'])
  return hidden @ p['w2'], [h, hidden]


def _toy_setup(recipe, step=0, total_steps=0):
  rng = np.random.default_rng(0)
  params = {'w1': jnp.asarray(rng.normal(0, 0.5, (16, 12)), jnp.float32),
            'w2': jnp.asarray(rng.normal(0, 0.5, (12, 5)), jnp.float32),
            'site': {pruning.A_PARAM: jnp.asarray(rng.uniform(-1, 2, 16), jnp.float32),
                     pruning.B_PARAM: jnp.asarray(rng.uniform(0, 1, 16), jnp.float32)}}
  x = jnp.asarray(rng.uniform(0, 1, (6, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, 6), jnp.int32)
  calls = []

  def forward(p, batch_stats, x, key, capture):
    calls.append((x, capture))
    logits, feats = _toy_net(p, x)
    return logits, batch_stats, feats if capture else []

  ctx = recipes.StepContext(
      forward=forward,
      eval_logits_fn=lambda p, bs: (lambda x, key: _toy_net(p, x)[0]),
      cross_entropy=training.cross_entropy, num_train=_N_TRAIN, unroll=False,
      total_steps=total_steps)

  @jax.jit
  def run(params, x, y):
    grads, _, metrics = recipes.recipe_grads(recipes.parse_recipe(recipe), ctx, params, {},
                                             None, x, y, jax.random.key(0), step)
    # The recorded inputs are values of this trace (they do not depend on params under
    # the vjp), so they can come out of the jit.
    return grads, metrics, [c[0] for c in calls]

  grads, metrics, inputs = jax.tree_util.tree_map(np.asarray, run(params, x, y))
  return params, x, y, [(i, c[1]) for i, c in zip(inputs, calls)], grads, metrics


def _ce(p, x, y):
  logits, feats = _toy_net(p, x)
  return jnp.mean(training.cross_entropy(logits, y)), feats


def _assert_close(a, b):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6),
                         a, b)


def test_anp_masks_and_weights_get_the_gradients_of_their_own_losses():
  beta, lam, aw, eps = 4.0, 0.5, 2.0, 0.2
  params, x, y, calls, grads, metrics = _toy_setup(
      f'anp(beta={beta}, lam={lam}, eps={eps}, steps=3, adv_weight={aw})')
  # Two training-mode passes: clean then adversarial, both capturing features.
  assert len(calls) == 2 and calls[0][1] and calls[1][1]
  np.testing.assert_array_equal(calls[0][0], x)
  x_adv = calls[1][0]
  assert 0 < np.max(np.abs(x_adv - x)) <= eps + 1e-6
  assert np.min(x_adv) >= 0 and np.max(x_adv) <= 1

  def weights_loss(p):
    ce_clean, f_clean = _ce(p, x, y)
    ce_adv, f_adv = _ce(p, x_adv, y)
    return ((ce_clean + aw * ce_adv) / (1 + aw) + beta * pruning.kl_total(p) / _N_TRAIN
            + lam * pruning.vulnerability(f_clean, f_adv))

  def masks_loss(p):
    return _ce(p, x_adv, y)[0] + beta * pruning.kl_total(p) / _N_TRAIN

  @jax.jit
  def reference(p):
    v = pruning.vulnerability(_toy_net(p, x)[1], _toy_net(p, x_adv)[1])
    return (jax.grad(weights_loss)(p), jax.grad(masks_loss)(p), weights_loss(p), masks_loss(p),
            pruning.kl_total(p), v)

  gw, gm, w_loss, m_loss, kl, v = jax.tree_util.tree_map(np.asarray, reference(params))
  _assert_close({k: grads[k] for k in ('w1', 'w2')}, {k: gw[k] for k in ('w1', 'w2')})
  _assert_close(grads['site'], gm['site'])
  # The two objectives really differ on both groups, so the selection matters.
  assert not np.allclose(gw['site'][pruning.A_PARAM], gm['site'][pruning.A_PARAM], rtol=1e-3)
  assert not np.allclose(gw['w1'], gm['w1'], rtol=1e-3)
  np.testing.assert_allclose(metrics['loss'], w_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['mask_loss'], m_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['kl'], kl, rtol=1e-6)
  np.testing.assert_allclose(metrics['vulnerability'], v, rtol=1e-5)
  assert v > 0


def test_attack_strength_ramps_linearly_over_the_warmup_fraction():
  h = recipes.parse_recipe('pgd_at(eps=0.3, steps=10, eps_warmup=0.25)').hparams
  # 0.25 of 400 steps = 100 steps of ramp; default step size 2.5 * 0.3 / 10 = 0.075.
  for step, ramp in [(0, 0.0), (10, 0.1), (50, 0.5), (100, 1.0), (399, 1.0)]:
    eps, step_size = recipes.attack_strength(h, step, 400)
    np.testing.assert_allclose([eps, step_size], [0.3 * ramp, 0.075 * ramp], rtol=1e-6)
  h = recipes.parse_recipe('pgd_at(eps=0.3, step_size=0.04)').hparams
  assert recipes.attack_strength(h, 0, 400) == (0.3, 0.04)  # no warm-up: constants
  h = recipes.parse_recipe('anp(beta=4, lam=0, eps=0.3, eps_warmup=0.5)').hparams
  with pytest.raises(ValueError, match='eps_warmup'):
    recipes.attack_strength(h, 0, 0)


@pytest.mark.parametrize('step,expected_eps', [(0, 0.0), (25, 0.1), (50, 0.2), (80, 0.2)])
def test_anp_attack_follows_the_warmup(step, expected_eps):
  params, x, y, calls, grads, metrics = _toy_setup(
      'anp(beta=4, lam=0.5, eps=0.2, steps=3, eps_warmup=0.5)', step=step, total_steps=100)
  np.testing.assert_allclose(metrics['attack_eps'], expected_eps, rtol=1e-6)
  x_adv = calls[1][0]
  # Sign steps of 2.5 eps / 3 reach the (clipped) ball's edge: the largest move is eps.
  np.testing.assert_allclose(np.max(np.abs(x_adv - x)), expected_eps, atol=1e-6)


def test_bp_uses_clean_cross_entropy_plus_kl_for_every_parameter():
  params, x, y, calls, grads, metrics = _toy_setup('bp(beta=4, kl_examples=10)')
  assert len(calls) == 1 and not calls[0][1]  # one clean pass, no attack, no features

  def loss(p):
    return _ce(p, x, y)[0] + 4 * pruning.kl_total(p) / 10  # kl_examples overrides N

  expected_loss, expected_grads = jax.jit(jax.value_and_grad(loss))(params)
  _assert_close(grads, expected_grads)
  np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-5)
  assert float(metrics['loss']) == float(metrics['mask_loss'])
  assert 'adv_accuracy' not in metrics and 'vulnerability' not in metrics


def test_select_by_group_takes_mask_leaves_from_the_second_tree():
  params = {'conv': {'kernel': 1.0, 'bias': 2.0},
            'conv_out': {pruning.A_PARAM: 3.0, pruning.B_PARAM: 4.0},
            'deep': {'fc_in': {pruning.A_PARAM: 5.0}}}
  first = jax.tree_util.tree_map(lambda v: v + 10, params)
  second = jax.tree_util.tree_map(lambda v: v + 100, params)
  out = recipes._select_by_group(params, first, second)
  assert out == {'conv': {'kernel': 11.0, 'bias': 12.0},
                 'conv_out': {pruning.A_PARAM: 103.0, pruning.B_PARAM: 104.0},
                 'deep': {'fc_in': {pruning.A_PARAM: 105.0}}}
  assert recipes.mask_labels(params) == {
      'conv': {'kernel': 'weights', 'bias': 'weights'},
      'conv_out': {pruning.A_PARAM: 'masks', pruning.B_PARAM: 'masks'},
      'deep': {'fc_in': {pruning.A_PARAM: 'masks'}}}


# ---------------------------------------------------------------------------------------
# The two-group optimizer.
# ---------------------------------------------------------------------------------------


def _opt_params():
  return {'fc': {'kernel': jnp.full((3, 2), 0.5), 'bias': jnp.full((2,), -0.5)},
          'fc_in': {pruning.A_PARAM: jnp.full((3,), -1.0),
                    pruning.B_PARAM: jnp.full((3,), pruning.B_UC_INIT)}}


def _train_config(**kw):
  tc = config_utils.base_config().train
  tc.update(num_epochs=1, **kw)
  return tc


def test_masks_get_adam_at_scaled_learning_rate_and_no_weight_decay():
  spe = 4
  tc = _train_config(optimizer='adam', learning_rate=1e-3, weight_decay=0.1,
                     schedule='piecewise', boundaries=(0.5,), decay_factor=0.1)
  schedule = training.make_schedule(tc, spe)
  weights_tx = training.create_optimizer(tc, spe)
  assert recipes.wrap_optimizer(recipes.parse_recipe('pgd_at(eps=0.1)'), weights_tx,
                                schedule) is weights_tx
  tx = recipes.wrap_optimizer(recipes.parse_recipe('anp(beta=4, lam=0, eps=0.1, '
                                                   'mask_lr_scale=10)'), weights_tx, schedule)
  params = _opt_params()
  state = tx.init(params)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  lrs = [float(schedule(t)) for t in range(spe)]
  # The decay happens within these steps.
  assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
  for t in range(spe):
    updates, state = tx.update(ones, state, params)
    params = optax.apply_updates(params, updates)
    # Adam's step with a constant gradient is -lr (bias-corrected moments, eps 1e-8).
    for leaf in jax.tree_util.tree_leaves(updates['fc_in']):
      np.testing.assert_allclose(leaf, -10 * lrs[t], rtol=1e-4)
    for leaf in jax.tree_util.tree_leaves(updates['fc']):
      np.testing.assert_allclose(leaf, -lrs[t], rtol=1e-2)

  # Zero gradients: the weights still decay, the masks do not move at all.
  params = _opt_params()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for leaf in jax.tree_util.tree_leaves(updates['fc_in']):
    np.testing.assert_array_equal(leaf, 0.0)
  # Adam normalises the decay term 0.1 * p to a step of -lr * sign(p).
  np.testing.assert_allclose(updates['fc']['kernel'], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates['fc']['bias'], 1e-3, rtol=1e-4)

  # SGD with coupled weight decay: the exact decay step on weights, none on masks.
  tc = _train_config(optimizer='sgd', learning_rate=0.1, momentum=0.9, weight_decay=0.01,
                     schedule='constant')
  tx = recipes.wrap_optimizer(recipes.parse_recipe('bp(beta=4, mask_lr_scale=3)'),
                              training.create_optimizer(tc, spe), training.make_schedule(tc, spe))
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['fc']['kernel'], -0.1 * 0.01 * 0.5, rtol=1e-6)
  for leaf in jax.tree_util.tree_leaves(updates['fc_in']):
    np.testing.assert_array_equal(leaf, 0.0)
  updates, _ = tx.update(ones, tx.init(params), params)
  for leaf in jax.tree_util.tree_leaves(updates['fc_in']):
    np.testing.assert_allclose(leaf, -3 * 0.1, rtol=1e-5)  # Adam at 3 x 0.1


# ---------------------------------------------------------------------------------------
# Adversarial training makes small_cnn on digits more robust than standard training.
# ---------------------------------------------------------------------------------------


def _digits_config(recipe, epochs):
  c = config_utils.base_config()  # digits, small_cnn, SGD 0.1 cosine, batch 128
  c.train.update(num_epochs=epochs, recipe=recipe, checkpoint_every_epochs=0,
                 eval_every_epochs=epochs)
  c.eval.update(attacks=(), checks=False)
  c.report.tensorboard = False
  c.parallel.num_devices = 1
  return c


@pytest.mark.slow
def test_pgd_training_beats_standard_training_under_pgd(tmp_path):
  epochs = 4
  accuracy = {}
  for name, recipe, metrics in [
      ('standard', 'standard', {'loss', 'accuracy'}),
      ('pgd_at', 'pgd_at(eps=0.1, steps=2, clean_weight=1, adv_weight=1)',
       {'loss', 'accuracy', 'adv_accuracy'})]:
    workdir = str(tmp_path / name)
    report = experiment.run(_digits_config(recipe, epochs), workdir, progress=False)
    assert set(report['training']['final_train']) == metrics
    assert report['training']['final_test']['accuracy'] > 0.95
    run = runs.load_run(workdir)
    assert run.step == report['training']['steps']
    accuracy[name] = _pgd_accuracy(run.model, run.variables, run.splits)
  # Observed (seed 0, 4 epochs, 360 test digits; clean accuracy 0.978 and 0.986), PGD-20 at
  # eps 0.1: standard 0.619, pgd_at 0.756 (with 8 epochs and PGD-5 in training: 0.653 and
  # 0.842).
  assert accuracy['pgd_at'] > accuracy['standard'] + 0.07, accuracy


@functools.partial(jax.jit, static_argnums=0)
def _robust_correct(model, variables, x, y):
  logits_fn = lambda x, key: model.apply(variables, x, train=False)
  x_adv = attacks.pgd(logits_fn, jax.random.key(0), x, y, eps=0.1, steps=20)
  return jnp.argmax(logits_fn(x_adv, None), -1) == y


def _pgd_accuracy(model, variables, splits):
  x = data_lib.to_float(splits.test_images)
  y = splits.test_labels.astype(np.int32)
  return float(np.mean(_robust_correct(model, variables, x, y)))
