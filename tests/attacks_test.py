"""Tests for advdef.attacks: exact constraints, closed forms, EOT/BPDA plumbing, strength.

The strength tests train a small MLP on sklearn's 8x8 digits (scaled to [0, 1]) once per
module; everything else uses tiny random or linear models.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from advdef import attacks
from advdef.attacks import gradient

# ----------------------------------------------------------------------------------------
# Models and data.
# ----------------------------------------------------------------------------------------


def _linear_logits_fn(w, b):
  """logits = flatten(x) @ w + b; deterministic (ignores the key)."""
  return lambda x, key: x.reshape(x.shape[0], -1) @ w + b[None, :]


def _stochastic_mlp(seed, shape, num_classes=10, noise=0.1):
  """A random tanh MLP whose hidden input gets Gaussian noise drawn from the model key."""
  dim = math.prod(shape)
  k1, k2 = jax.random.split(jax.random.key(seed))
  w1 = jax.random.normal(k1, (dim, 32)) / math.sqrt(dim)
  w2 = jax.random.normal(k2, (32, num_classes)) * 3.0 / math.sqrt(32)

  def logits_fn(x, key):
    h = x.reshape(x.shape[0], -1)
    h = h + noise * jax.random.normal(key, h.shape)
    return jnp.tanh(h @ w1 * 4.0) @ w2

  return logits_fn


def _corner_inputs(shape, seed=0):
  """Inputs at the box corners and faces, plus random ones: float32[8, *shape]."""
  rng = np.random.RandomState(seed)
  xs = [
      np.zeros(shape),
      np.ones(shape),
      rng.randint(0, 2, shape),  # random corner of the box
      rng.uniform(size=shape),
      rng.uniform(size=shape),
      np.full(shape, 1.0 - 2.0**-24),
      np.where(rng.uniform(size=shape) < 0.5, 0.7, 0.3),
      rng.uniform(0.9, 1.0, size=shape),
  ]
  return np.stack(xs).astype(np.float32)


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


@pytest.fixture(scope='module')
def digits():
  """A trained digits MLP: (logits_fn, x_test float32[100, 8, 8, 1], y_test int32[100])."""
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  perm = np.random.RandomState(0).permutation(len(images))
  train, test = perm[:1400], perm[1400:1500]
  model = _MLP()
  params = model.init(jax.random.key(0), images[:1])
  optimizer = optax.adam(3e-3)
  x_train, y_train = jnp.asarray(images[train]), jnp.asarray(labels[train])

  @jax.jit
  def train_step(params, opt_state):

    def loss_fn(p):
      logits = model.apply(p, x_train)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for _ in range(300):
    params, opt_state = train_step(params, opt_state)
  logits_fn = jax.jit(lambda x, key: model.apply(params, x))
  x_test, y_test = jnp.asarray(images[test]), jnp.asarray(labels[test])
  clean_acc = _accuracy(logits_fn, x_test, y_test)
  assert clean_acc >= 0.9, clean_acc  # Otherwise the robustness tests would be vacuous.
  return logits_fn, x_test, y_test


def _accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x, None), -1) == y))


def _assert_in_ball_and_box(x, x_adv, eps, norm):
  x, x_adv = np.asarray(x), np.asarray(x_adv)
  assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  d32 = (x_adv - x).reshape(len(x), -1)
  d64 = x_adv.astype(np.float64).reshape(len(x), -1) - x.astype(np.float64).reshape(len(x), -1)
  if norm == 'linf':
    assert np.abs(d32).max() <= np.float32(eps)  # float32 arithmetic, as numpy does it
    assert np.abs(d64).max() <= eps  # exact difference against the float64 eps
  else:
    assert np.all(np.linalg.norm(d32, axis=1) <= np.float32(eps))
    assert np.all(np.sqrt(np.sum(d32 * d32, axis=1, dtype=np.float32)) <= np.float32(eps))
    assert np.all(np.linalg.norm(d64, axis=1) <= eps)
    assert np.all(attacks.perturbation_norms(x, x_adv, 'l2') <= eps)


# ----------------------------------------------------------------------------------------
# Losses and helpers.
# ----------------------------------------------------------------------------------------


def test_loss_sign_conventions():
  logits = jnp.asarray([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
  y = jnp.asarray([0, 0], jnp.int32)  # first correct, second misclassified
  np.testing.assert_allclose(attacks.margin(logits, y), [-2.0, 2.0])
  np.testing.assert_allclose(attacks.dlr(logits, y), [-2.0 / 3.0, 2.0 / 1.5], rtol=1e-6)
  ce = attacks.cross_entropy(logits, y)
  np.testing.assert_allclose(ce, -jax.nn.log_softmax(logits)[:, 0], rtol=1e-6)
  assert ce[1] > ce[0] > 0
  # Targeted DLR: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2).
  np.testing.assert_allclose(
      attacks.dlr_targeted(logits, y, jnp.asarray([1, 1])), [-2.0 / 3.5, 2.0 / 1.75],
      rtol=1e-6)
  assert set(attacks.LOSSES) == {'cross_entropy', 'margin', 'dlr'}
  assert attacks.get_loss('ce') is attacks.cross_entropy
  with pytest.raises(ValueError, match='3 classes'):
    attacks.dlr(logits[:, :2], y)


def test_perturbation_norms():
  x = jnp.asarray(np.full((2, 2, 2, 1), 0.5, np.float32))
  x_adv = x.at[0, 0, 0, 0].add(0.3).at[1].add(-0.1)
  np.testing.assert_allclose(attacks.perturbation_norms(x, x_adv, 'linf'), [0.3, 0.1],
                             rtol=1e-6)
  np.testing.assert_allclose(attacks.perturbation_norms(x, x_adv, 'l2'), [0.3, 0.2], rtol=1e-6)
  np.testing.assert_allclose(attacks.relative_perturbation_norms(x, x_adv, 'linf'),
                             [0.6, 0.2], rtol=1e-6)
  np.testing.assert_allclose(attacks.relative_perturbation_norms(x, x_adv, 'l2'),
                             [0.3, 0.2], rtol=1e-6)  # ||x||_2 = 1


# ----------------------------------------------------------------------------------------
# Exact constraints (and no retrace across eps) for every attack with an eps.
# ----------------------------------------------------------------------------------------

_EPS = {'linf': (0.0, 1e-3, 8 / 255, 0.1, 0.3, 1.0), 'l2': (0.0, 1e-3, 0.5, 1.7, 3.0)}

_BUDGETED = [
    ('fgsm', 'linf', dict(random_start=True)),
    ('fgsm', 'l2', dict()),
    ('pgd', 'linf', dict(steps=4, restarts=2, eot_samples=2)),
    ('pgd', 'l2', dict(steps=4, restarts=2, track_best=True, loss='margin')),
    ('apgd', 'linf', dict(steps=6, eot_samples=2)),
    ('apgd', 'l2', dict(steps=6, restarts=2, loss='dlr')),
    ('apgd_targeted', 'linf', dict(steps=4, num_target_classes=2)),
    ('square', 'linf', dict(queries=30, eot_samples=2)),
    ('square', 'l2', dict(queries=30)),
    ('autoattack_standard', 'l2', dict(steps=3, queries=10, num_target_classes=2)),
    ('autoattack_rand', 'linf', dict(steps=3, eot_samples=2)),
    ('cw_l2', 'l2', dict(steps=10, search_steps=2, learning_rate=0.1, initial_const=10.0)),
]


@pytest.mark.parametrize('name,norm,hparams', _BUDGETED,
                         ids=[f'{n}-{m}' for n, m, _ in _BUDGETED])
def test_results_lie_exactly_in_ball_and_box(name, norm, hparams):
  x = _corner_inputs((6, 6, 3))
  y = jnp.arange(len(x), dtype=jnp.int32) % 10
  logits_fn = _stochastic_mlp(1, x.shape[1:])
  attack = attacks.get_attack(name)
  if name != 'cw_l2':
    hparams = dict(hparams, norm=norm)
  traces = []

  def run(key, x, y, eps):
    traces.append(None)
    return attack(logits_fn, key, x, y, eps=eps, **hparams)

  run = jax.jit(run)
  # The attacks must not reuse keys (jax's experimental checker runs at trace time).
  with jax.debug_key_reuse(True):
    for i, eps in enumerate(_EPS[norm]):
      x_adv = run(jax.random.key(i), x, y, eps)
      _assert_in_ball_and_box(x, x_adv, eps, norm)
      if eps == 0.0:
        np.testing.assert_array_equal(x_adv, x)
  assert len(traces) == 1  # eps is traced: changing it did not recompile


def test_eps_change_does_not_retrace(digits):
  logits_fn, x, y = digits
  traces = []

  def counted(x, key):
    traces.append(None)
    return logits_fn(x, key)

  attack = jax.jit(functools.partial(attacks.pgd, counted, steps=3))
  key = jax.random.key(0)
  attack(key, x, y, eps=0.1)
  n = len(traces)
  assert n > 0
  x_adv = attack(key, x, y, eps=0.2)
  assert len(traces) == n
  assert float(attacks.perturbation_norms(x, x_adv, 'linf').max()) > 0.1
  # An explicit step size is a traced number too (None -> number is one new trace).
  attack(key, x, y, eps=0.2, step_size=0.05)
  attack(key, x, y, eps=0.05, step_size=0.01)
  assert len(traces) == 2 * n


def test_random_start_is_inside_ball():
  x = _corner_inputs((5, 5, 1))
  y = jnp.zeros(len(x), jnp.int32)
  logits_fn = _linear_logits_fn(jnp.zeros((25, 3)), jnp.zeros(3))  # zero gradient: no move
  for norm, eps in (('linf', 0.05), ('l2', 0.5)):
    x_adv = attacks.pgd(logits_fn, jax.random.key(3), x, y, eps=eps, steps=1, norm=norm)
    _assert_in_ball_and_box(x, x_adv, eps, norm)
    assert np.abs(np.asarray(x_adv) - x).max() > 0


# ----------------------------------------------------------------------------------------
# Closed forms on a linear 2-class model.
# ----------------------------------------------------------------------------------------


def _two_class_problem(seed=0, shape=(4, 4, 1), low=0.0, high=1.0):
  rng = np.random.RandomState(seed)
  dim = math.prod(shape)
  w = rng.normal(size=(dim, 2)).astype(np.float32)
  b = rng.normal(size=2).astype(np.float32)
  x = rng.uniform(low, high, size=(6,) + shape).astype(np.float32)
  y = rng.randint(0, 2, size=6).astype(np.int32)
  # For CE, margin or DLR-free losses the input gradient of a linear 2-class model points
  # along w_other - w_y (times a positive factor).
  direction = np.stack([w[:, 1 - c] - w[:, c] for c in y]).reshape(x.shape)
  return _linear_logits_fn(jnp.asarray(w), jnp.asarray(b)), x, y, direction


@pytest.mark.parametrize('loss', ['cross_entropy', 'margin'])
def test_fgsm_linf_matches_closed_form(loss):
  logits_fn, x, y, direction = _two_class_problem()
  eps = 0.1
  x_adv = attacks.fgsm(logits_fn, jax.random.key(0), x, y, eps=eps, loss=loss)
  expected = np.clip(x + np.float32(eps) * np.sign(direction), 0.0, 1.0)
  np.testing.assert_allclose(x_adv, expected, rtol=0, atol=1e-6)


def test_fgm_l2_matches_closed_form():
  logits_fn, x, y, direction = _two_class_problem(low=0.3, high=0.7)
  eps = 0.2
  x_adv = attacks.fgsm(logits_fn, jax.random.key(0), x, y, eps=eps, norm='l2')
  unit = direction / np.linalg.norm(direction.reshape(6, -1), axis=1).reshape(6, 1, 1, 1)
  np.testing.assert_allclose(x_adv, x + eps * unit, rtol=0, atol=1e-5)


def test_pgd_linf_matches_closed_form():
  logits_fn, x, y, direction = _two_class_problem()
  eps, alpha, steps = 0.1, 0.03, 5
  x_adv = attacks.pgd(logits_fn, jax.random.key(0), x, y, eps=eps, step_size=alpha,
                      steps=steps, random_start=False)
  expected = x.copy()
  for _ in range(steps):  # The sign direction is constant for a linear model.
    expected = np.clip(np.clip(expected + np.float32(alpha) * np.sign(direction),
                               x - np.float32(eps), x + np.float32(eps)), 0, 1)
  np.testing.assert_allclose(x_adv, expected, rtol=0, atol=1e-6)


def test_pgd_l2_moves_along_the_gradient():
  # Inputs in [0.3, 0.7] so the box never binds: x_adv = x + min(steps * alpha, eps) * unit.
  logits_fn, x, y, direction = _two_class_problem(low=0.3, high=0.7)
  unit = direction / np.linalg.norm(direction.reshape(6, -1), axis=1).reshape(6, 1, 1, 1)
  key = jax.random.key(0)
  x_adv = attacks.pgd(logits_fn, key, x, y, eps=0.5, step_size=0.1, steps=3, norm='l2',
                      random_start=False)
  np.testing.assert_allclose(x_adv, x + 0.3 * unit, rtol=0, atol=1e-6)
  # Ball binding: the result sits on the sphere (up to the documented 2^-16 slack).
  x_adv = attacks.pgd(logits_fn, key, x, y, eps=0.25, step_size=0.1, steps=5, norm='l2',
                      random_start=False)
  np.testing.assert_allclose(x_adv, x + 0.25 * (1 - 2**-16) * unit, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# PGD against an independent minimal implementation.
# ----------------------------------------------------------------------------------------


def _project_l2_box_float64(delta, x, eps):
  """The Euclidean projection of delta onto {||d||_2 <= eps} and [-x, 1 - x], per example,
  in float64: d = clip(s * delta) with the largest s in [0, 1] whose norm is <= eps (the
  norm is monotone in s), found by 100 halvings."""
  out = np.empty_like(delta)
  for i in range(len(x)):
    v, lo, hi = delta[i].ravel(), -x[i].ravel(), 1.0 - x[i].ravel()
    size = lambda s: np.linalg.norm(np.clip(s * v, lo, hi))
    s = 1.0
    if size(1.0) > eps:
      a, b = 0.0, 1.0
      for _ in range(100):
        m = 0.5 * (a + b)
        a, b = (m, b) if size(m) <= eps else (a, m)
      s = a
    out[i] = np.clip(s * v, lo, hi).reshape(x[i].shape)
  return out


def _reference_pgd(logits_fn, x0, x, y, eps, alpha, steps, norm):
  """Textbook PGD in numpy: ascent step, then the exact projection onto the ball and the box
  (L-inf: clip to both; L2: `_project_l2_box_float64`). x0 is the start."""

  @jax.jit
  def grad(x_adv):
    return jax.grad(lambda z: jnp.sum(attacks.cross_entropy(logits_fn(z, None), y)))(x_adv)

  dtype = np.float32 if norm == 'linf' else np.float64
  x, x_adv = np.asarray(x, dtype), np.asarray(x0, dtype)
  batch_shape = (len(x),) + (1,) * (x.ndim - 1)
  for _ in range(steps):
    g = np.asarray(grad(jnp.asarray(x_adv, jnp.float32)), dtype)
    if norm == 'linf':
      x_adv = np.clip(np.clip(x_adv + alpha * np.sign(g), x - eps, x + eps), 0.0, 1.0)
    else:
      g_norm = np.linalg.norm(g.reshape(len(x), -1), axis=1).reshape(batch_shape)
      delta = x_adv + alpha * g / np.maximum(g_norm, 1e-12) - x
      x_adv = x + _project_l2_box_float64(delta, x, eps)
  return x_adv


@pytest.mark.parametrize('norm,eps,alpha', [('linf', 0.1, 0.02), ('l2', 1.0, 0.25)])
def test_pgd_matches_independent_reference(digits, norm, eps, alpha):
  logits_fn, x, y = digits
  x, y = x[:32], y[:32]
  key = jax.random.key(7)
  # A zero step returns the (already projected) random start of the same key.
  x0 = attacks.pgd(logits_fn, key, x, y, eps=eps, step_size=0.0, steps=1, norm=norm)
  x_adv = attacks.pgd(logits_fn, key, x, y, eps=eps, step_size=alpha, steps=10, norm=norm)
  # The documented effective L2 radius keeps 2^-16 (relative) of slack for float rounding;
  # with the nominal eps the trajectories drift apart by ~1e-4 over the 10 steps.
  radius = eps * (1 - 2**-16) if norm == 'l2' else eps
  expected = _reference_pgd(logits_fn, x0, x, y, radius, alpha, 10, norm)
  np.testing.assert_allclose(x_adv, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# EOT, BPDA, fixed randomness, transfer.
# ----------------------------------------------------------------------------------------


def test_eot_of_deterministic_model_is_exact(digits):
  logits_fn, x, y = digits
  key = jax.random.key(0)
  np.testing.assert_array_equal(
      attacks.eot_logits_fn(logits_fn, 2)(x, key), logits_fn(x, key))
  np.testing.assert_allclose(
      attacks.eot_logits_fn(logits_fn, 8, average='probs')(x, key),
      jax.nn.log_softmax(logits_fn(x, key)), atol=1e-5)
  # FGM's output is x + eps * grad / ||grad||: equal outputs = equal gradients.
  for attack, kw in ((attacks.fgsm, dict(norm='l2', eps=0.5)),
                     (attacks.pgd, dict(eps=0.1, steps=5)),
                     (attacks.apgd, dict(eps=0.1, steps=10, loss='dlr'))):
    plain = attack(logits_fn, key, x, y, **kw)
    for average in attacks.EOT_AVERAGES[:2]:
      eot = attack(logits_fn, key, x, y, eot_samples=2, eot_average=average, **kw)
      np.testing.assert_array_equal(eot, plain)


def test_eot_averages_vectorised_draws():
  logits_fn = _stochastic_mlp(2, (3, 3, 1), noise=0.5)
  x = jnp.asarray(_corner_inputs((3, 3, 1)))
  key = jax.random.key(4)
  draws = [logits_fn(x, k) for k in jax.random.split(key, 5)]
  np.testing.assert_allclose(attacks.eot_logits_fn(logits_fn, 5)(x, key),
                             np.mean(draws, axis=0), rtol=1e-5, atol=1e-6)
  log_probs = [jax.nn.log_softmax(d) for d in draws]
  np.testing.assert_allclose(
      attacks.eot_logits_fn(logits_fn, 5, average='probs')(x, key),
      np.log(np.mean(np.exp(log_probs), axis=0)), rtol=1e-5, atol=1e-5)


def test_fixed_randomness_freezes_draws():
  logits_fn = _stochastic_mlp(3, (3, 3, 1), noise=0.5)
  x = jnp.asarray(_corner_inputs((3, 3, 1)))
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  assert not np.allclose(logits_fn(x, k1), logits_fn(x, k2))
  frozen = attacks.fixed_randomness(logits_fn, k0)
  np.testing.assert_array_equal(frozen(x, k1), logits_fn(x, k0))
  np.testing.assert_array_equal(frozen(x, k2), logits_fn(x, k0))


@jax.custom_vjp
def _jump(h):
  return jnp.where(h > 0.5, 1.0, 0.0)


def _jump_fwd(h):
  return _jump(h), None


def _jump_bwd(_, g):
  return (g,)  # BPDA: the backward pass of the identity


_jump.defvjp(_jump_fwd, _jump_bwd)


def test_attack_follows_bpda_surrogate_gradient():
  rng = np.random.RandomState(0)
  w = jnp.asarray(rng.normal(size=(16, 2)).astype(np.float32))
  x = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
  y = rng.randint(0, 2, size=6).astype(np.int32)
  flat = lambda h: h.reshape(h.shape[0], -1)
  exact = lambda x, key: flat(jnp.where(x > 0.5, 1.0, 0.0)) @ w  # zero gradient everywhere
  bpda = lambda x, key: flat(_jump(x)) @ w  # same forward pass, identity backward pass
  np.testing.assert_array_equal(exact(x, None), bpda(x, None))
  key = jax.random.key(0)
  np.testing.assert_array_equal(attacks.fgsm(exact, key, x, y, eps=0.1), x)
  direction = np.stack([w[:, 1 - c] - w[:, c] for c in y]).reshape(x.shape)
  np.testing.assert_allclose(attacks.fgsm(bpda, key, x, y, eps=0.1),
                             np.clip(x + np.float32(0.1) * np.sign(direction), 0, 1), atol=1e-6)


def test_transfer_attack_crafts_on_the_source(digits):
  source, x, y = digits
  target = lambda x, key: -source(x, key)
  key = jax.random.key(0)
  pgd3 = functools.partial(attacks.pgd, steps=3)
  transferred = attacks.transfer_attack(pgd3, source)(target, key, x, y, eps=0.1)
  np.testing.assert_array_equal(transferred, pgd3(source, key, x, y, eps=0.1))


# ----------------------------------------------------------------------------------------
# Strength on the trained digits model.
# ----------------------------------------------------------------------------------------


def test_apgd_and_square_break_digits_model(digits):
  logits_fn, x, y = digits
  key = jax.random.key(0)
  assert _accuracy(logits_fn, x, y) >= 0.9
  x_apgd = jax.jit(functools.partial(attacks.apgd, logits_fn, steps=50))(key, x, y, eps=0.3)
  x_square = jax.jit(functools.partial(attacks.square, logits_fn, queries=1000))(
      key, x, y, eps=0.3)
  assert _accuracy(logits_fn, x_apgd, y) <= 0.05
  assert _accuracy(logits_fn, x_square, y) <= 0.10
  # Square leaves examples that were misclassified to begin with untouched.
  wrong = np.asarray(jnp.argmax(logits_fn(x, None), -1) != y)
  np.testing.assert_array_equal(np.asarray(x_square)[wrong], np.asarray(x)[wrong])


def test_apgd_checkpoints_follow_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
  is_checkpoint, interval = gradient._apgd_checkpoints(100)
  np.testing.assert_array_equal(np.flatnonzero(is_checkpoint) + 1,
                                [22, 41, 57, 70, 80, 87, 93, 99])
  np.testing.assert_array_equal(interval[is_checkpoint], [22, 19, 16, 13, 10, 7, 6, 6])


def test_autoattack_standard_is_per_example_worst_case(digits):
  logits_fn, x, y = digits
  key = jax.random.key(1)
  attack = jax.jit(functools.partial(attacks.autoattack_standard, logits_fn, steps=20,
                                     queries=200, num_target_classes=3))
  x_adv = attack(key, x, y, eps=0.1)
  _assert_in_ball_and_box(x, x_adv, 0.1, 'linf')
  x_ce = attacks.apgd(logits_fn, key, x, y, eps=0.1, steps=20)
  assert _accuracy(logits_fn, x_adv, y) <= _accuracy(logits_fn, x_ce, y)
  assert _accuracy(logits_fn, attack(key, x, y, eps=0.3), y) == 0.0


def test_restarts_are_at_least_as_strong(digits):
  logits_fn, x, y = digits
  key = jax.random.key(2)

  def scores(x_adv):
    logits = logits_fn(x_adv, None)
    return np.asarray(jnp.argmax(logits, -1) != y), np.asarray(attacks.cross_entropy(logits, y))

  one = functools.partial(attacks.pgd, logits_fn, key, x, y, eps=0.05, steps=5)
  mis1, loss1 = scores(one(restarts=1))
  mis4, loss4 = scores(one(restarts=4))
  assert np.all(mis4 | ~mis1)
  assert np.all((mis4 & ~mis1) | (loss4 >= loss1 - 1e-5))
  assert mis4.sum() >= mis1.sum()

  def apgd_margin(restarts):
    x_adv = attacks.apgd(logits_fn, key, x, y, eps=0.05, steps=10, restarts=restarts)
    return np.asarray(attacks.margin(logits_fn(x_adv, None), y))

  assert np.all(apgd_margin(3) >= apgd_margin(1) - 1e-5)


def test_minimum_perturbation_attacks_beat_large_eps_pgd(digits):
  logits_fn, x, y = digits
  key = jax.random.key(3)
  correct = np.asarray(jnp.argmax(logits_fn(x, None), -1) == y)
  med = lambda x_adv, norm, mask: float(
      np.median(np.asarray(attacks.perturbation_norms(x, x_adv, norm))[mask]))
  pgd_l2 = attacks.pgd(logits_fn, key, x, y, eps=3.0, norm='l2', steps=10)
  pgd_linf = attacks.pgd(logits_fn, key, x, y, eps=0.3, steps=10)
  assert _accuracy(logits_fn, pgd_l2, y) == 0.0 and _accuracy(logits_fn, pgd_linf, y) == 0.0

  results = {
      ('deepfool', 'l2'): attacks.deepfool(logits_fn, key, x, y, return_success=True),
      ('deepfool', 'linf'): attacks.deepfool(logits_fn, key, x, y, norm='linf',
                                             return_success=True),
      ('ifgsm_min', 'linf'): attacks.ifgsm_min(logits_fn, key, x, y, return_success=True),
      ('cw_l2', 'l2'): attacks.cw_l2(logits_fn, key, x, y, steps=300, return_success=True),
  }
  for (name, norm), (x_adv, success) in results.items():
    success = np.asarray(success)
    assert np.asarray(x_adv).min() >= 0 and np.asarray(x_adv).max() <= 1, name
    assert success.mean() >= 0.95, (name, success.mean())
    # The reported success is real: those examples are misclassified.
    mis = np.asarray(jnp.argmax(logits_fn(x_adv, None), -1) != y)
    np.testing.assert_array_equal(mis[success], True)
    reference = pgd_l2 if norm == 'l2' else pgd_linf
    ok = success & correct
    assert med(x_adv, norm, ok) < 0.5 * med(reference, norm, ok), name
  # DeepFool and ifgsm_min do not move examples that are misclassified to begin with.
  for key_ in (('deepfool', 'l2'), ('deepfool', 'linf'), ('ifgsm_min', 'linf')):
    np.testing.assert_array_equal(np.asarray(results[key_][0])[~correct],
                                  np.asarray(x)[~correct])
  # C&W returns x itself where it failed (nothing to report) and on misclassified inputs
  # it needs no perturbation at all.
  x_cw, success = results[('cw_l2', 'l2')]
  np.testing.assert_array_equal(np.asarray(x_cw)[~np.asarray(success)],
                                np.asarray(x)[~np.asarray(success)])


def test_ifgsm_min_matches_the_jumprelu_loop():
  # The paper's loop: FGSM steps of 0.01 on the still-correct examples only, clipped to the
  # box, no eps ball. On a linear 2-class model the sign direction is constant.
  logits_fn, x, y, direction = _two_class_problem(seed=1)
  steps, step = 60, np.float32(0.01)
  x_adv, success = attacks.ifgsm_min(logits_fn, jax.random.key(0), x, y, step_size=0.01,
                                     steps=steps, return_success=True)
  expected = x.copy()
  for _ in range(steps):
    correct = np.asarray(jnp.argmax(logits_fn(jnp.asarray(expected), None), -1)) == y
    moved = np.clip(expected + step * np.sign(direction), 0.0, 1.0)
    expected = np.where(correct.reshape(-1, 1, 1, 1), moved, expected)
  np.testing.assert_allclose(x_adv, expected, rtol=0, atol=1e-6)
  fooled = np.asarray(jnp.argmax(logits_fn(jnp.asarray(expected), None), -1)) != y
  np.testing.assert_array_equal(success, fooled)
  assert 0 < fooled.sum() and np.abs(np.asarray(x_adv) - x).max() > 0.05  # not vacuous


# ----------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------


def _never_called(x, key):
  raise AssertionError('validation must happen before any compute')


_KEY = jax.random.key(0)
_X = np.zeros((2, 4, 4, 1), np.float32)
_Y = np.zeros(2, np.int32)

_BAD = [
    (attacks.pgd, dict(eps=-0.1), 'eps'),
    (attacks.pgd, dict(eps=float('nan')), 'eps'),
    (attacks.pgd, dict(eps=float('inf')), 'eps'),
    (attacks.fgsm, dict(eps=jnp.asarray(-1.0)), 'eps'),
    (attacks.pgd, dict(eps=0.1, norm='l1'), 'valid choices: linf, l2'),
    (attacks.pgd, dict(eps=0.1, steps=0), 'steps'),
    (attacks.pgd, dict(eps=0.1, steps=2.5), 'steps'),
    (attacks.pgd, dict(eps=0.1, restarts=0), 'restarts'),
    (attacks.pgd, dict(eps=0.1, eot_samples=0), 'eot_samples'),
    (attacks.pgd, dict(eps=0.1, eot_average='median'), 'eot_average'),
    (attacks.pgd, dict(eps=0.1, loss='hinge'), 'loss'),
    (attacks.pgd, dict(eps=0.1, step_size=-1.0), 'step_size'),
    (attacks.apgd, dict(eps=0.1, rho=1.5), 'rho'),
    (attacks.apgd, dict(eps=-1.0), 'eps'),
    (attacks.apgd_targeted, dict(eps=0.1, num_target_classes=0), 'num_target_classes'),
    (attacks.square, dict(eps=0.1, queries=0), 'queries'),
    (attacks.square, dict(eps=0.1, p_init=0.0), 'p_init'),
    (attacks.ifgsm_min, dict(norm='l2'), "norm='l2' is not supported.*linf"),
    (attacks.cw_l2, dict(norm='linf'), "norm='linf' is not supported.*l2"),
    (attacks.cw_l2, dict(eps=-1.0), 'eps'),
    (attacks.cw_l2, dict(search_steps=0), 'search_steps'),
    (attacks.deepfool, dict(num_classes_considered=1), 'num_classes_considered'),
    (attacks.deepfool, dict(overshoot=-0.1), 'overshoot'),
    (attacks.autoattack_rand, dict(eps=0.1, eot_samples=0), 'eot_samples'),
    (attacks.autoattack_standard, dict(eps=0.1, norm='l0'), 'norm'),
]


@pytest.mark.parametrize('attack,hparams,message', _BAD)
def test_bad_hyperparameters_raise_before_compute(attack, hparams, message):
  with pytest.raises(ValueError, match=message):
    attack(_never_called, _KEY, _X, _Y, **hparams)


def test_registry():
  assert set(attacks.ATTACKS) == set(attacks.ATTACK_NORMS)
  assert attacks.get_attack('apgd') is attacks.apgd
  with pytest.raises(ValueError, match="'pgd'"):
    attacks.get_attack('pgd2')
  with pytest.raises(ValueError, match='num_samples'):
    attacks.eot_logits_fn(_never_called, 0)
  with pytest.raises(ValueError, match='average'):
    attacks.eot_logits_fn(_never_called, 2, average='loss')
