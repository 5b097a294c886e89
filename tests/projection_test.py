"""Tests for geometry.project_l2: the exact projection onto the L2 ball and the [0, 1] box.

The reference is a float64 numpy breakpoint solver (checked against float64 bisection); the
naive baseline is the former "scale into the ball, then clip to the box".
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advdef.attacks import geometry

SLACK = 2.0**-16
EPSILONS = (0.0, 1e-6, 0.1, 0.5, 3.0)

project = jax.jit(geometry.project_l2)


def _radius(eps):
  """The radius project_l2 aims for: float32 just below float32(eps), times 1 - 2^-16."""
  e = np.float32(eps)
  return float(np.nextafter(e, np.float32(0))) * (1 - SLACK) if e > 0 else 0.0


def _reference(v, x, r):
  """float64 projection of v onto {||d|| <= r} and [-x, 1 - x] by the breakpoint method.

  v, x: float64[n]. Coordinate i is free (s * v_i) below its knee and on its face c_i above,
  so ||clip(s v)||^2 = C_k + s^2 F_k between consecutive sorted knees; solve in closed form.
  """
  lo, hi = -x, 1.0 - x
  d = np.clip(v, lo, hi)
  if np.linalg.norm(d) <= r:
    return d
  with np.errstate(divide='ignore', invalid='ignore'):
    knee = np.where(v > 0, hi / v, np.where(v < 0, lo / v, np.inf))
  face_sq = np.where(v > 0, hi, lo)**2
  order = np.argsort(knee, kind='stable')
  knee, face_sq, free_sq = knee[order], face_sq[order], (v**2)[order]
  fixed = np.concatenate([[0.0], np.cumsum(face_sq)])  # C_k: the first k clipped
  free = np.concatenate([np.cumsum(free_sq[::-1])[::-1], [0.0]])  # F_k: the rest free
  left = np.concatenate([[0.0], knee])
  right = np.concatenate([knee, [np.inf]])
  for k in range(len(v) + 1):
    if free[k] <= 0 or fixed[k] > r * r:
      continue
    s = math.sqrt((r * r - fixed[k]) / free[k])
    if left[k] * (1 - 1e-12) <= s <= right[k] * (1 + 1e-12):
      return np.clip(min(s, 1.0) * v, lo, hi)
  raise AssertionError('no breakpoint interval holds the root')


def _bisection(v, x, r, halvings=200):
  """Independent float64 check of the reference: bisection on s in [0, 1]."""
  f = lambda s: np.linalg.norm(np.clip(s * v, -x, 1.0 - x))
  a, b = 0.0, 1.0
  if f(1.0) <= r:
    return np.clip(v, -x, 1.0 - x)
  for _ in range(halvings):
    m = 0.5 * (a + b)
    a, b = (m, b) if f(m) <= r else (a, m)
  return np.clip(a * v, -x, 1.0 - x)


def _naive(x_adv, x, r):
  """The former projection (float64): scale into the ball, then clip to the box."""
  delta = (x_adv - x).reshape(len(x), -1)
  norm = np.linalg.norm(delta, axis=1, keepdims=True)
  scale = np.where(norm > r, r / np.maximum(norm, 1e-300), 1.0)
  return np.clip(x.reshape(len(x), -1) + scale * delta, 0.0, 1.0).reshape(x.shape)


def _inputs(seed, shape=(12, 6, 6, 3)):
  """Centres with box corners and faces, and far-off x_adv that make both constraints bind."""
  rng = np.random.RandomState(seed)
  n = math.prod(shape[1:])
  kinds = [
      rng.uniform(size=shape[1:]),
      rng.randint(0, 2, shape[1:]).astype(float),
      np.where(rng.uniform(size=shape[1:]) < 0.5, rng.randint(0, 2, shape[1:]),
               rng.uniform(size=shape[1:])),
      rng.beta(0.2, 0.2, shape[1:]),
  ]
  x = np.stack([kinds[i % 4] for i in range(shape[0])]).astype(np.float32)
  scales = 10.0**rng.uniform(-2, 0.5, size=(shape[0],) + (1,) * (len(shape) - 1))
  noise = np.where(rng.uniform(size=shape) < 0.2, rng.standard_cauchy(shape),
                   rng.normal(size=shape))
  x_adv = (x + scales * noise / math.sqrt(n) * 8).astype(np.float32)
  return x, x_adv


def _flat(a):
  return np.asarray(a, np.float64).reshape(len(a), -1)


def test_reference_agrees_with_bisection():
  x, x_adv = _inputs(0)
  for i in range(len(x)):
    v, xi = _flat(x_adv)[i] - _flat(x)[i], _flat(x)[i]
    for r in (0.05, 0.5, 2.0):
      np.testing.assert_allclose(_reference(v, xi, r), _bisection(v, xi, r), atol=1e-12)


@pytest.mark.parametrize('seed', range(6))
def test_matches_float64_projection_and_beats_ball_then_clip(seed):
  x, x_adv = _inputs(seed)
  binding = 0  # examples where both the ball and the box bind and the naive result is off
  for eps in (0.1, 0.5, 1.0, 3.0):
    r = _radius(eps)
    out = np.asarray(project(jnp.asarray(x_adv), jnp.asarray(x), eps))
    naive = _naive(x_adv.astype(np.float64), x.astype(np.float64), r)
    v = _flat(x_adv) - _flat(x)
    for i in range(len(x)):
      ref = _reference(v[i], _flat(x)[i], r)
      got = _flat(out)[i] - _flat(x)[i]
      np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
      # Optimality: never farther from x_adv than ball-then-clip, strictly nearer where
      # ball-then-clip is not the projection.
      dist_new = np.linalg.norm(got - v[i])
      dist_ref = np.linalg.norm(ref - v[i])
      dist_naive = np.linalg.norm(_flat(naive)[i] - _flat(x)[i] - v[i])
      assert dist_new <= dist_naive + 1e-5 * (1 + dist_naive), (eps, i)
      if np.abs(_flat(naive)[i] - _flat(x)[i] - ref).max() > 1e-3:
        binding += 1
        gain = dist_naive - dist_ref
        assert gain > 0
        assert dist_new <= dist_naive - 0.5 * gain, (eps, i, dist_new, dist_naive, dist_ref)
        # Ball-then-clip stops strictly inside the ball; where the box alone does not bring
        # x_adv into the ball, the projection uses the whole radius.
        assert np.linalg.norm(_flat(naive)[i] - _flat(x)[i]) < r * (1 - 1e-4)
        if np.linalg.norm(np.clip(v[i], -_flat(x)[i], 1 - _flat(x)[i])) > r:
          assert np.linalg.norm(got) == pytest.approx(r, rel=1e-5, abs=1e-6)
        else:
          np.testing.assert_array_equal(out[i], np.clip(x_adv[i], 0, 1))
  assert binding >= 10  # the cases above really exercise the difference


@pytest.mark.parametrize('seed', range(10))
def test_feasible_for_every_eps(seed):
  x, x_adv = _inputs(100 + seed)
  x_adv[0] = x[0] + 5.0  # far outside the box
  x_adv[1] = x[1]  # zero perturbation
  for eps in EPSILONS:
    out = project(jnp.asarray(x_adv), jnp.asarray(x), eps)
    assert np.all(np.asarray(geometry.flat_l2(out - jnp.asarray(x))) <= np.float32(eps)), eps
    arr = np.asarray(out)
    # numpy float32 pairwise summation and float64 measurements agree with the bound too.
    diff32 = (arr - x).reshape(len(x), -1)
    assert np.all(np.sqrt(np.sum(np.square(diff32), axis=1)) <= np.float32(eps)), eps
    assert np.all(np.linalg.norm(_flat(arr) - _flat(x), axis=1) <= eps), eps
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    if eps == 0.0:
      np.testing.assert_array_equal(arr, x)


def test_per_example_and_traced_eps():
  x, x_adv = _inputs(7)
  eps = np.array([0.0, 1e-6, 0.1, 0.5, 3.0, 0.2] * 2, np.float32)
  out = np.asarray(project(jnp.asarray(x_adv), jnp.asarray(x), jnp.asarray(eps)))
  v = _flat(x_adv) - _flat(x)
  for i in range(len(x)):
    assert np.linalg.norm(_flat(out)[i] - _flat(x)[i]) <= eps[i]
    if eps[i] >= 0.1:
      np.testing.assert_allclose(_flat(out)[i] - _flat(x)[i],
                                 _reference(v[i], _flat(x)[i], _radius(eps[i])), atol=1e-5)
  # A scalar eps and the same value per example agree.
  same = project(jnp.asarray(x_adv), jnp.asarray(x), jnp.full(len(x), 0.5, jnp.float32))
  np.testing.assert_array_equal(same, project(jnp.asarray(x_adv), jnp.asarray(x), 0.5))


def test_large_batch_matches_reference():
  # The benchmark shape: CIFAR-sized examples, box binding at most pixels for some.
  rng = np.random.RandomState(3)
  x = rng.uniform(size=(4, 32, 32, 3)).astype(np.float32)
  x[1] = rng.randint(0, 2, x.shape[1:])
  x_adv = (x + rng.normal(size=x.shape) * np.array([0.02, 0.05, 0.3, 1.0])[:, None, None, None])
  x_adv = x_adv.astype(np.float32)
  out = np.asarray(project(jnp.asarray(x_adv), jnp.asarray(x), 0.5))
  v = _flat(x_adv) - _flat(x)
  for i in range(len(x)):
    np.testing.assert_allclose(_flat(out)[i] - _flat(x)[i],
                               _reference(v[i], _flat(x)[i], _radius(0.5)), atol=1e-5)


def test_identity_inside_both_sets():
  rng = np.random.RandomState(11)
  x = rng.uniform(size=(8, 6, 6, 3)).astype(np.float32)
  x[:2] = rng.randint(0, 2, (2, 6, 6, 3))
  direction = rng.normal(size=x.shape)
  direction /= np.linalg.norm(direction.reshape(8, -1), axis=1)[:, None, None, None]
  x_adv = np.clip(x + 0.3 * direction, 0, 1).astype(np.float32)  # in the box, norm <= 0.3
  for eps in (0.3, 0.5, 3.0):
    np.testing.assert_array_equal(project(jnp.asarray(x_adv), jnp.asarray(x), eps), x_adv)
  np.testing.assert_array_equal(project(jnp.asarray(x), jnp.asarray(x), 0.0), x)
  # Only the box binds: the projection is the plain clip.
  outside = np.where(direction > 0, 1.5, -0.5).astype(np.float32)
  np.testing.assert_array_equal(project(jnp.asarray(outside), jnp.asarray(x), 1e3),
                                np.clip(outside, 0, 1))


@pytest.mark.parametrize('seed', range(4))
def test_variational_inequality(seed):
  # p is the projection of q onto a convex set K iff <q - p, z - p> <= 0 for all z in K.
  x, x_adv = _inputs(200 + seed)
  rng = np.random.RandomState(seed)
  for eps in (0.1, 0.5, 3.0):
    r = _radius(eps)
    p = _flat(project(jnp.asarray(x_adv), jnp.asarray(x), eps)) - _flat(x)
    v = _flat(x_adv) - _flat(x)
    xf = _flat(x)
    for _ in range(20):
      # Random feasible z: a box-feasible perturbation, scaled into the ball (0 is in the box).
      # Large draws mostly land on the sphere, small ones inside it.
      d = np.clip(rng.normal(size=v.shape) * 10.0**rng.uniform(-3, 1), -xf, 1 - xf)
      d *= np.minimum(1.0, r / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-300))
      inner = np.sum((v - p) * (d - p), axis=1)
      scale = np.linalg.norm(v - p, axis=1) * np.linalg.norm(d - p, axis=1)
      assert np.all(inner <= 1e-5 * (1 + scale)), (eps, inner.max())


def test_under_vmap_and_traced_eps():
  # PGD's restarts vmap the projection over x_adv with a shared x; eps is traced.
  x, x_adv = _inputs(9)
  stack = np.stack([x_adv, np.clip(x_adv, 0, 1), x + 0.01]).astype(np.float32)
  fn = jax.jit(jax.vmap(geometry.project_l2, in_axes=(0, None, None)))
  out = fn(jnp.asarray(stack), jnp.asarray(x), jnp.float32(0.5))
  for k in range(len(stack)):
    np.testing.assert_array_equal(out[k], project(jnp.asarray(stack[k]), jnp.asarray(x), 0.5))
