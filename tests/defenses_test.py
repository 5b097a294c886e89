"""Tests for advdef.defenses: exactness of SAP's law, gradients, traced hyperparameters, MC helpers.

Statistical tests use fixed seeds and tolerances sized from exact standard errors (z = 5) or
chi-square tests with a small fixed alpha (1e-4), so they are deterministic and not flaky.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from advdef import defenses

Z = 5.0        # Normal-theory tolerance for per-unit checks.
ALPHA = 1e-4   # Chi-square tests: accept the exact law unless p < ALPHA.


def _rows(p_row, num_rows):
  """float32[num_rows, n]: the same unnormalised probability vector in every row."""
  return jnp.tile(jnp.asarray(p_row, jnp.float32)[None, :], (num_rows, 1))


@functools.partial(jax.jit, static_argnames=('frac', 'gradient'))
def _sap(key, x, frac=1.0, gradient='constant'):
  return defenses.sap(key, x, frac=frac, gradient=gradient)


@functools.partial(jax.jit, static_argnames=('gradient',))
def _sap_grad(key, x, v, gradient='constant'):
  """d/dx sum(v * sap(key, x))."""
  return jax.grad(lambda x: jnp.sum(v * defenses.sap(key, x, gradient=gradient)))(x)


@functools.partial(jax.jit, static_argnames=('frac',))
def _sap_bernoulli(key, x, frac=1.0):
  return defenses.sap_bernoulli(key, x, frac=frac)


# Non-uniform probabilities with a zero unit; frac = 0.75 -> r = 9 draws over n = 12 units.
P_ROW = np.array([5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.1, 0.0, 0.05, 2.6])
FRAC = 0.75
R = int(FRAC * len(P_ROW))
NUM_ROWS = 40_000


@pytest.fixture(scope='module')
def sap_samples():
  x = _rows(P_ROW, NUM_ROWS)
  return np.asarray(_sap(jax.random.key(0), x, frac=FRAC))


def _exact_keep_prob(p_row, r):
  p = p_row / p_row.sum()
  return 1.0 - (1.0 - p) ** r


# ------------------------------------------------------------------------------------------
# SAP: the law of the kept set.


def test_sap_keep_frequencies_match_one_minus_one_minus_p_to_the_r(sap_samples):
  q = _exact_keep_prob(P_ROW, R)
  freq = (sap_samples != 0).mean(axis=0)
  assert freq[P_ROW == 0].max() == 0.0  # p = 0 units are never kept
  pos = P_ROW > 0
  se = np.sqrt(q[pos] * (1 - q[pos]) / NUM_ROWS)
  np.testing.assert_array_less(np.abs(freq[pos] - q[pos]), Z * se)


def test_sap_is_unbiased(sap_samples):
  q = _exact_keep_prob(P_ROW, R)
  pos = P_ROW > 0
  mean = sap_samples.mean(axis=0)
  # out_j = x_j / q_j w.p. q_j, else 0: Var = x_j^2 (1 / q_j - 1).
  se = P_ROW[pos] * np.sqrt((1 / q[pos] - 1) / NUM_ROWS)
  np.testing.assert_array_less(np.abs(mean[pos] - P_ROW[pos]), Z * se + 1e-6)
  # Kept units carry exactly the inverse-propensity scale.
  kept = sap_samples != 0
  scale = np.where(kept, sap_samples / np.where(kept, P_ROW, 1.0), 0)
  np.testing.assert_allclose(scale.max(axis=0)[pos], 1 / q[pos], rtol=1e-5)


def _occupancy_pmf_uniform(n, r):
  """Exact P(#distinct = k) for r draws with replacement from n equiprobable units."""
  # Stirling numbers of the second kind S(r, k) by the standard recurrence, in exact integers.
  s = [[0] * (r + 1) for _ in range(r + 1)]
  s[0][0] = 1
  for i in range(1, r + 1):
    for k in range(1, i + 1):
      s[i][k] = k * s[i - 1][k] + s[i - 1][k - 1]
  pmf = np.zeros(r + 1)
  for k in range(1, min(n, r) + 1):
    pmf[k] = math.comb(n, k) * s[r][k] * math.factorial(k) / n**r
  return pmf


def _chi2_pvalue(counts, expected_probs, min_expected=5.0):
  """Goodness-of-fit p-value, pooling sparse tail bins into their neighbours."""
  counts = np.asarray(counts, float)
  expected = np.asarray(expected_probs, float) * counts.sum()
  obs_bins, exp_bins, o, e = [], [], 0.0, 0.0
  for oi, ei in zip(counts, expected):
    o, e = o + oi, e + ei
    if e >= min_expected:
      obs_bins.append(o), exp_bins.append(e)
      o, e = 0.0, 0.0
  obs_bins[-1] += o
  exp_bins[-1] += e
  return stats.chisquare(obs_bins, exp_bins).pvalue


def test_sap_distinct_count_is_that_of_sampling_with_replacement_uniform():
  n, num = 32, 20_000
  x = jnp.ones((num, n), jnp.float32)
  pmf = _occupancy_pmf_uniform(n, n)  # SAP-100: r = n draws
  exact_counts = np.bincount((np.asarray(_sap(jax.random.key(1), x)) != 0).sum(1),
                             minlength=n + 1)
  assert _chi2_pvalue(exact_counts, pmf) > ALPHA
  # The same test must reject the independent-Bernoulli approximation.
  bern = np.asarray(_sap_bernoulli(jax.random.key(1), x))
  bern_counts = np.bincount((bern != 0).sum(1), minlength=n + 1)
  assert _chi2_pvalue(bern_counts, pmf) < 1e-12


def _two_sample_pvalue(a, b):
  """Chi-square homogeneity p-value of two samples of small nonnegative integers."""
  top = max(a.max(), b.max()) + 1
  table = np.stack([np.bincount(a, minlength=top), np.bincount(b, minlength=top)])
  table = table[:, table.sum(0) > 0]
  # Pool bins with small expected counts (from the left and the right) into their neighbours.
  cols, acc = [], np.zeros(2)
  for col in table.T:
    acc = acc + col
    if acc.sum() >= 40:
      cols.append(acc)
      acc = np.zeros(2)
  cols[-1] = cols[-1] + acc
  return stats.chi2_contingency(np.stack(cols, 1))[1]


def test_sap_distinct_count_is_that_of_sampling_with_replacement_nonuniform():
  num = 20_000
  x = _rows(P_ROW, num)
  got = (np.asarray(_sap(jax.random.key(2), x, frac=FRAC)) != 0).sum(1)
  # Reference: numpy's own generator drawing R i.i.d. categorical indices per row.
  rng = np.random.default_rng(0)
  idx = rng.choice(len(P_ROW), size=(num, R), p=P_ROW / P_ROW.sum())
  ref = np.array([len(np.unique(row)) for row in idx])
  assert _two_sample_pvalue(got, ref) > ALPHA
  bern = (np.asarray(_sap_bernoulli(jax.random.key(2), x, frac=FRAC)) != 0).sum(1)
  assert _two_sample_pvalue(bern, ref) < 1e-12


def test_sap_bernoulli_marginals_and_unbiasedness():
  num = 20_000
  x = _rows(P_ROW, num)
  out = np.asarray(_sap_bernoulli(jax.random.key(3), x, frac=FRAC))
  p = P_ROW / P_ROW.sum()
  q = 1 - np.exp(-R * p)
  pos = p > 0
  freq = (out != 0).mean(0)
  assert freq[~pos].max() == 0.0
  np.testing.assert_array_less(np.abs(freq[pos] - q[pos]), Z * np.sqrt(q[pos] * (1 - q[pos]) / num))
  se = P_ROW[pos] * np.sqrt((1 / q[pos] - 1) / num)
  np.testing.assert_array_less(np.abs(out.mean(0)[pos] - P_ROW[pos]), Z * se + 1e-6)


# ------------------------------------------------------------------------------------------
# SAP: numerical safety and gradients.


@pytest.mark.parametrize('gradient', defenses.SAP_GRADIENTS)
def test_sap_zeros_give_zeros_and_finite_gradients(gradient):
  x = jnp.array([[0.0] * 6, [0.0, 1.0, 0.0, 2.0, 0.0, 0.5], [0.0] * 5 + [3.0]], jnp.float32)
  key = jax.random.key(4)
  out = _sap(key, x, gradient=gradient)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(np.asarray(out)[x == 0], 0.0)
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[2], x[2])  # a single nonzero unit: p = 1, kept, scale 1
  weights = jnp.tile(jnp.arange(6.0)[None, :], (3, 1))
  g = _sap_grad(key, x, weights, gradient=gradient)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(g[0], 0.0)


@pytest.mark.parametrize('gradient', defenses.SAP_GRADIENTS)
def test_sap_tiny_probabilities_are_finite(gradient):
  row = np.full(1000, 1e-30, np.float32)
  row[0] = 1.0
  row[1] = 1e-6
  x = _rows(row, 64)
  key = jax.random.key(5)
  out = np.asarray(_sap(key, x, gradient=gradient))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:, 0], 1.0)  # q = 1 for the dominant unit
  g = _sap_grad(key, x, jnp.ones_like(x), gradient=gradient)
  assert np.all(np.isfinite(g))


def test_keep_probability_is_accurate_for_tiny_p():
  p = jnp.array([1e-12, 1e-9, 1e-6, 0.3, 1.0], jnp.float32)
  r = jnp.int32(16384)
  got = np.asarray(defenses._keep_probability(p, r), np.float64)
  pd = np.asarray(p, np.float64)
  want = -np.expm1(16384 * np.log1p(-np.minimum(pd, 1 - 2.0**-24)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[0] > 0  # float32 pow would round 1 - (1 - 1e-12)^r to 0


def test_sap_constant_gradient_equals_the_mask():
  x = jax.nn.relu(jax.random.normal(jax.random.key(6), (8, 5, 5, 4)))
  key = jax.random.key(7)
  out = _sap(key, x)
  mask = _sap_grad(key, x, jnp.ones_like(x))
  np.testing.assert_array_equal(out, x * mask)
  np.testing.assert_array_equal(np.asarray(mask)[np.asarray(out) == 0], 0.0)


def test_sap_through_scale_gradient_flows_through_p():
  x = jax.nn.relu(jax.random.normal(jax.random.key(8), (4, 30))) + 0.1
  key = jax.random.key(9)
  v = jax.random.normal(jax.random.key(10), x.shape)
  out = _sap(key, x, gradient='through_scale')
  keep = out != 0

  def reference(x):  # the same estimator with the kept set frozen, differentiated in float64
    a = jnp.abs(x)
    p = a / jnp.sum(a, axis=1, keepdims=True)
    q = -jnp.expm1(30 * jnp.log1p(-p))
    return jnp.sum(v * jnp.where(keep, x / jnp.where(keep, q, 1.0), 0.0))

  got = _sap_grad(key, x, v, gradient='through_scale')
  np.testing.assert_allclose(got, jax.grad(reference)(x), rtol=1e-4, atol=1e-5)
  constant = _sap_grad(key, x, v)
  assert np.abs(np.asarray(got) - np.asarray(constant)).max() > 1e-3


# ------------------------------------------------------------------------------------------
# SAP: keys, batches, traced frac.


def test_sap_vmap_over_frac_equals_loop():
  x = jax.nn.relu(jax.random.normal(jax.random.key(11), (6, 7, 7, 3)))
  key = jax.random.key(12)
  grid = [0.1, 0.5, 1.0]
  # x is an argument, not a closed-over constant, so XLA does not constant-fold part of the
  # computation (its folder rounds transcendentals differently from the compiled kernels).
  swept = jax.jit(jax.vmap(lambda f, x: defenses.sap(key, x, frac=f), (0, None)))(
      jnp.array(grid), x)
  for i, f in enumerate(grid):
    looped = jax.jit(lambda x, f=f: defenses.sap(key, x, frac=f))(x)  # concrete frac
    np.testing.assert_array_equal(swept[i], looped)


def test_sap_is_reproducible_across_vmap_jit_and_eager():
  x = jax.nn.relu(jax.random.normal(jax.random.key(31), (4, 300)))
  keys = jax.random.split(jax.random.key(32), 3)
  swept = jax.jit(jax.vmap(defenses.sap, (0, None)))(keys, x)
  for i, k in enumerate(keys):
    np.testing.assert_array_equal(swept[i], _sap(k, x))
  np.testing.assert_array_equal(defenses.sap(keys[0], x), _sap(keys[0], x))  # eager == jit


def test_sap_traced_frac_is_clipped_to_max_frac():
  x = jax.nn.relu(jax.random.normal(jax.random.key(13), (3, 20)))
  key = jax.random.key(14)
  swept = jax.jit(jax.vmap(lambda f, x: defenses.sap(key, x, frac=f, max_frac=0.5), (0, None)))(
      jnp.array([0.5, 2.0]), x)
  np.testing.assert_array_equal(swept[0], swept[1])
  np.testing.assert_array_equal(swept[0], _sap(key, x, frac=0.5))


def test_sap_frac_below_one_draw_gives_zeros():
  x = jnp.ones((2, 10), jnp.float32)
  np.testing.assert_array_equal(defenses.sap(jax.random.key(0), x, frac=0.05), 0.0)


def test_sap_keys_and_batch_examples_are_independent():
  x = _rows(P_ROW, 2)
  a = np.asarray(_sap(jax.random.key(15), x))
  assert np.array_equal(a, np.asarray(_sap(jax.random.key(15), x)))  # deterministic
  assert not np.array_equal(a, np.asarray(_sap(jax.random.key(16), x)))
  assert not np.array_equal(a[0] != 0, a[1] != 0)  # identical rows, different draws
  # Row b depends only on x[b] and the key, not on the other rows.
  other = x.at[1].set(jnp.asarray(P_ROW[::-1], jnp.float32))
  np.testing.assert_array_equal(_sap(jax.random.key(15), other)[0], a[0])
  np.testing.assert_array_equal(_sap(jax.random.key(15), x[:1])[0], a[0])  # nor on the batch size
  # No correlation between the keep indicators of two identical rows.
  num = 20_000
  out = np.asarray(_sap(jax.random.key(17), _rows(P_ROW, 2 * num), frac=FRAC)) != 0
  both = (out[:num] & out[num:]).mean(0)
  q = _exact_keep_prob(P_ROW, R)
  pos = P_ROW > 0
  se = np.sqrt(q[pos]**2 * (1 - q[pos]**2) / num)
  np.testing.assert_array_less(np.abs(both[pos] - q[pos]**2), Z * se)


def test_sap_preserves_shape_and_dtype():
  x = jax.nn.relu(jax.random.normal(jax.random.key(18), (3, 4, 4, 2))).astype(jnp.bfloat16)
  out = _sap(jax.random.key(19), x)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  out = _sap_bernoulli(jax.random.key(19), x)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# JumpReLU.


def test_jump_relu_exact_values_at_and_around_kappa():
  kappa = 0.5
  x = jnp.array([kappa, np.nextafter(np.float32(kappa), np.float32(1)), kappa + 1e-6,
                 kappa - 1e-6, 0.0, -1.0, 2.0], jnp.float32)
  want = np.where(np.asarray(x) > kappa, np.asarray(x), 0.0)
  np.testing.assert_array_equal(want[:3], [0.0, np.asarray(x)[1], np.asarray(x)[2]])
  for surrogate, kwargs in [(None, {}), ('relu', {}), ('sigmoid', dict(temperature=0.1))]:
    np.testing.assert_array_equal(
        defenses.jump_relu(x, kappa=kappa, surrogate=surrogate, **kwargs), want)
  np.testing.assert_array_equal(defenses.jump_relu(x, kappa=0.0), jax.nn.relu(x))


def test_jump_relu_gradients():
  x = jnp.linspace(-1.0, 2.0, 61, dtype=jnp.float32)
  kappa = 0.5
  loss = lambda surrogate, **kw: (lambda x: jnp.sum(
      defenses.jump_relu(x, kappa=kappa, surrogate=surrogate, **kw)))
  np.testing.assert_array_equal(jax.grad(loss(None))(x), (x > kappa).astype(jnp.float32))
  np.testing.assert_array_equal(jax.grad(loss('relu'))(x), (x > 0).astype(jnp.float32))
  smooth = lambda x: jnp.sum(x * jax.nn.sigmoid((x - kappa) / 0.2))
  # Both jitted, so both are compiled the same way (eager op-by-op dispatch may round
  # differently from a fused kernel).
  np.testing.assert_array_equal(jax.jit(jax.grad(loss('sigmoid', temperature=0.2)))(x),
                                jax.jit(jax.grad(smooth))(x))
  # Surrogates send nothing to kappa.
  dk = jax.grad(lambda k: jnp.sum(defenses.jump_relu(x, kappa=k, surrogate='relu')))(0.5)
  assert dk == 0.0


JUMP_CASES = [dict(), dict(surrogate='relu'), dict(surrogate='sigmoid', temperature=0.1)]


def test_jump_relu_vmap_over_kappa_equals_loop():
  x = jax.random.normal(jax.random.key(20), (5, 9))
  grid = jnp.array([0.0, 0.1, 0.5, 1.0])
  for surrogate in JUMP_CASES:
    fn = lambda k, x: defenses.jump_relu(x, kappa=k, **surrogate)
    swept = jax.jit(jax.vmap(fn, (0, None)))(grid, x)
    gswept = jax.jit(jax.vmap(jax.grad(lambda x, k: jnp.sum(fn(k, x) ** 2)), (None, 0)))(x, grid)
    for i, k in enumerate(grid):
      np.testing.assert_array_equal(swept[i], fn(float(k), x))
      np.testing.assert_allclose(gswept[i], jax.grad(lambda x: jnp.sum(fn(float(k), x) ** 2))(x),
                                 rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Gaussian noise (RSE).


def test_gaussian_noise_moments_and_identity():
  n, sigma = 200_000, 0.3
  x = jnp.full((n,), 2.0, jnp.float32)
  noise = np.asarray(defenses.gaussian_noise(jax.random.key(21), x, sigma=sigma), np.float64) - 2.0
  assert abs(noise.mean()) < Z * sigma / math.sqrt(n)
  assert abs(noise.var() - sigma**2) < Z * sigma**2 * math.sqrt(2 / n)
  y = jax.random.normal(jax.random.key(22), (4, 5))
  np.testing.assert_array_equal(defenses.gaussian_noise(jax.random.key(23), y, sigma=0.0), y)
  noise_fn = jax.jit(lambda k, y, s: defenses.gaussian_noise(k, y, sigma=s))
  np.testing.assert_array_equal(noise_fn(jax.random.key(23), y, 0.0), y)  # traced sigma = 0
  a = defenses.gaussian_noise(jax.random.key(24), y, sigma=0.1)
  assert not np.array_equal(a, defenses.gaussian_noise(jax.random.key(25), y, sigma=0.1))


def test_gaussian_noise_law_is_standard_normal_and_symmetric():
  # The sampler is sqrt(2) erfinv(v) on a symmetric 23-bit grid: check the whole law (KS),
  # the tails (P(|z| > 3) exactly), and that v never reaches +-1 (finite samples).
  z = np.asarray(defenses.gaussian_noise(jax.random.key(26), jnp.zeros((400_000,)), sigma=1.0),
                 np.float64)
  assert np.isfinite(z).all()
  assert stats.kstest(z, 'norm').pvalue > ALPHA
  tail = 2 * stats.norm.sf(3.0)
  assert abs(np.mean(np.abs(z) > 3) - tail) < Z * math.sqrt(tail * (1 - tail) / z.size)
  # The extreme grid points map to finite values below 5.5 sigma in magnitude.
  assert np.abs(z).max() < 5.5
  # bfloat16 activations get float32 noise rounded to bfloat16.
  h = defenses.gaussian_noise(jax.random.key(27), jnp.zeros((8, 4), jnp.bfloat16), sigma=0.5)
  assert h.dtype == jnp.bfloat16 and np.isfinite(np.asarray(h, np.float32)).all()


def test_random_words_are_prefix_stable_uniform_and_differ_by_key():
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(4))
  # For a fixed tile (half), every count is a prefix of a longer one: within the first
  # tile's first words, across into its second words, and across tiles (counts > 2 * half).
  long = defenses._random_words(keys, 4000, 1500)
  for count in (7, 1499, 1500, 1501, 2999, 3001):
    np.testing.assert_array_equal(defenses._random_words(keys, count, 1500), long[:, :count])
  assert len(np.unique(np.asarray(long))) > 0.99 * long.size  # no repeated blocks
  bits = np.unpackbits(np.asarray(long).view(np.uint8))
  assert abs(bits.mean() - 0.5) < Z * 0.5 / math.sqrt(bits.size)
  assert len({tuple(row[:4]) for row in np.asarray(long)}) == 4
  # Both words of a block are used: the stream is not jax.random.bits' (one word per block).
  assert not np.array_equal(long[0, :8], jax.random.bits(keys[0], (8,), jnp.uint32))
  # Other key implementations fall back to jax.random.bits, so sap accepts them too.
  rbg = jax.random.split(jax.random.key(0, impl='rbg'), 2)
  assert defenses._random_words(rbg, 5).shape == (2, 5)
  assert defenses._row_words(rbg[0], jnp.arange(3), 5).shape == (3, 5)


def test_row_words_give_each_row_its_own_stream_of_one_key():
  key = jax.random.key(8)
  rows = defenses._row_words(key, jnp.arange(6), 3001, 1500)
  # Row 0 is random_words' stream of the key; every row is prefix-stable and depends only on
  # its own index (not on which rows are drawn with it).
  np.testing.assert_array_equal(rows[0], defenses._random_words(key[None], 3001, 1500)[0])
  np.testing.assert_array_equal(defenses._row_words(key, jnp.array([4, 1]), 1501, 1500),
                                rows[jnp.array([4, 1]), :1501])
  words = np.asarray(rows)
  assert len(np.unique(words)) > 0.99 * words.size  # rows do not share blocks
  bits = np.unpackbits(words.view(np.uint8))
  assert abs(bits.mean() - 0.5) < Z * 0.5 / math.sqrt(bits.size)
  # Adjacent rows are uncorrelated bit for bit (a shared or shifted counter would correlate).
  agree = np.unpackbits((words[:-1] ^ words[1:]).view(np.uint8)).mean()
  assert abs(agree - 0.5) < Z * 0.5 / math.sqrt(words[1:].size * 32)
  # Under vmap over keys (EOT) each key gives its own rows.
  keys = jax.random.split(jax.random.key(9), 2)
  both = jax.vmap(lambda k: defenses._row_words(k, jnp.arange(3), 10))(keys)
  np.testing.assert_array_equal(both[1], defenses._row_words(keys[1], jnp.arange(3), 10))
  assert not np.array_equal(both[0], both[1])
  h = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 64)))
  kept = defenses.sap(jax.random.key(5, impl='rbg'), h, frac=1.0)
  assert kept.shape == h.shape and np.isfinite(np.asarray(kept)).all()


def test_gaussian_noise_vmap_over_sigma_equals_loop():
  y = jax.random.normal(jax.random.key(26), (4, 5))
  key = jax.random.key(27)
  grid = jnp.array([0.0, 0.05, 0.2])
  swept = jax.vmap(lambda s: defenses.gaussian_noise(key, y, sigma=s))(grid)
  for i, s in enumerate(grid):
    np.testing.assert_array_equal(swept[i], defenses.gaussian_noise(key, y, sigma=float(s)))


# ------------------------------------------------------------------------------------------
# Monte-Carlo helpers.


def _noisy_logits_fn(x, key):
  return jnp.stack([x[:, 0], x[:, 1]], 1) + defenses.gaussian_noise(key, jnp.zeros((x.shape[0], 2)),
                                                                     sigma=1.0)


def test_mc_probabilities_vectorised_over_split_keys():
  x = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.3, 0.2]], jnp.float32)
  key = jax.random.key(28)
  mean, per_draw = defenses.mc_probabilities(_noisy_logits_fn, key, x, num_draws=7)
  assert mean.shape == (3, 2) and per_draw.shape == (7, 3, 2)
  keys = jax.random.split(key, 7)
  looped = np.stack([jax.nn.softmax(_noisy_logits_fn(x, k)) for k in keys])
  np.testing.assert_array_equal(per_draw, looped)
  assert len({tuple(np.asarray(d).ravel().round(6)) for d in per_draw}) == 7  # distinct draws
  np.testing.assert_allclose(mean, per_draw.mean(0), rtol=1e-6)
  chunked_mean, chunked = defenses.mc_probabilities(_noisy_logits_fn, key, x, num_draws=7,
                                                    chunk_size=3)
  # Same keys and draws; lax.map compiles its body, so softmax may round differently from the
  # op-by-op vmap above.
  np.testing.assert_allclose(chunked, per_draw, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(chunked_mean, mean, rtol=1e-6)
  pred = defenses.mc_predict(_noisy_logits_fn, key, x, num_draws=7)
  np.testing.assert_array_equal(pred, np.argmax(mean, -1))


def test_mc_probabilities_of_a_deterministic_model():
  x = jax.random.normal(jax.random.key(29), (5, 4))
  mean, per_draw = defenses.mc_probabilities(lambda x, key: x * 2.0, jax.random.key(30), x,
                                             num_draws=4)
  for d in range(4):
    np.testing.assert_array_equal(per_draw[d], jax.nn.softmax(x * 2.0))
  np.testing.assert_allclose(mean, per_draw[0], rtol=1e-6)


def test_per_draw_accuracy_interval():
  correct = np.array([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], bool)
  mask = np.array([True, True, True, True, False])
  got = defenses.per_draw_accuracy_interval(correct, mask)
  acc = correct[:, :4].mean(1)
  half = stats.t.ppf(0.975, 3) * acc.std(ddof=1) / 2
  assert got['num_draws'] == 4 and got['num_examples'] == 4
  np.testing.assert_allclose([got['mean'], got['ci95_low'], got['ci95_high']],
                             [acc.mean(), acc.mean() - half, acc.mean() + half])
  one = defenses.per_draw_accuracy_interval(correct[:1])
  assert one['mean'] == 0.8 and math.isnan(one['ci95_low'])


# ------------------------------------------------------------------------------------------
# Hyperparameter validation.


@pytest.mark.parametrize('call, name', [
    (lambda: defenses.sap(jax.random.key(0), jnp.ones((2, 3)), frac=0.0), 'frac'),
    (lambda: defenses.sap(jax.random.key(0), jnp.ones((2, 3)), frac=-1.0), 'frac'),
    (lambda: defenses.sap(jax.random.key(0), jnp.ones((2, 3)), frac=float('nan')), 'frac'),
    (lambda: defenses.sap(jax.random.key(0), jnp.ones((2, 3)), gradient='bogus'), 'gradient'),
    (lambda: defenses.sap(jax.random.key(0), jnp.ones((2, 3)), frac=1.0, max_frac=0.5),
     'max_frac'),
    (lambda: defenses.sap(jax.random.key(0), jnp.ones((3,))), 'x'),
    (lambda: defenses.sap_bernoulli(jax.random.key(0), jnp.ones((2, 3)), frac=0.0), 'frac'),
    (lambda: defenses.jump_relu(jnp.ones(3), kappa=-0.1), 'kappa'),
    (lambda: defenses.jump_relu(jnp.ones(3), kappa=float('nan')), 'kappa'),
    (lambda: defenses.jump_relu(jnp.ones(3), kappa=0.1, surrogate='tanh'), 'surrogate'),
    (lambda: defenses.jump_relu(jnp.ones(3), kappa=0.1, surrogate='sigmoid'), 'temperature'),
    (lambda: defenses.jump_relu(jnp.ones(3), kappa=0.1, surrogate='sigmoid', temperature=0.0),
     'temperature'),
    (lambda: defenses.gaussian_noise(jax.random.key(0), jnp.ones(3), sigma=-1.0), 'sigma'),
    (lambda: defenses.gaussian_noise(jax.random.key(0), jnp.ones(3), sigma=float('nan')),
     'sigma'),
    (lambda: defenses.mc_probabilities(lambda x, k: x, jax.random.key(0), jnp.ones((2, 2)),
                                       num_draws=0), 'num_draws'),
])
def test_bad_hyperparameters_raise_naming_the_argument(call, name):
  with pytest.raises(ValueError, match=name):
    call()


def test_traced_hyperparameters_are_not_checked():
  # Under vmap the values are tracers: no check, no error (the sweep owns its grid).
  x = jnp.ones((2, 3))
  jax.vmap(lambda k: defenses.jump_relu(x, kappa=k))(jnp.array([0.0, 1.0]))
  jax.vmap(lambda s: defenses.gaussian_noise(jax.random.key(0), x, sigma=s))(jnp.array([0.0, 1.0]))
  jax.jit(jax.vmap(lambda f: defenses.sap(jax.random.key(0), x, frac=f)))(jnp.array([0.5, 1.0]))
