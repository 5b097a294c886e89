"""Test-time defenses as pure functions of arrays and keys (no Flax), plus Monte-Carlo inference.

Every stochastic defense has the role signature `defense(key, x, *, hparams) -> x'` (key first,
as in `jax.random`); deterministic ones take no key. Keys are typed (`jax.random.key`).
Numeric hyperparameters (SAP's `frac`, JumpReLU's `kappa`, RSE's `sigma`) may be traced, so one
compiled function can `jax.vmap` over a grid of them; structural ones (`gradient`, `surrogate`,
`max_frac`, `num_draws`, `chunk_size`) are static Python values. Invalid concrete
hyperparameters raise `ValueError` naming the argument; traced ones are not checked.

Components
----------
Defenses:
  sap              Stochastic Activation Pruning (Dhillon et al. 2018), Algorithm 1 exactly:
                   r = floor(frac * n) categorical draws WITH replacement from p = |x| / sum|x|
                   per example; a unit drawn at least once is kept and scaled by
                   1 / (1 - (1 - p)^r), the others become 0.
  sap_bernoulli    Athalye et al.'s independent-Bernoulli approximation of SAP (comparison only).
  jump_relu        JumpReLU (Erichson et al. 2019): x * 1[x > kappa]; optional BPDA surrogate
                   backward pass ('relu' or 'sigmoid').
  gaussian_noise   The RSE noise layer (Liu et al. 2018): x + sigma * N(0, I) (erfinv of
                   Threefry words, both words of each block; compiles ~5x faster on XLA:CPU
                   than `jax.random.normal`, whose program took ~3 s to compile).
Monte-Carlo inference for stochastic models `logits_fn(x, key) -> float32[B, K]`:
  mc_probabilities mean softmax over draws (vmapped over keys, optionally chunked).
  mc_predict       argmax of the mean softmax.
  per_draw_accuracy_interval   mean single-draw accuracy with a 95% t-interval over draws.
Hyperparameter checks:
  check_positive, check_nonnegative   ValueError naming the argument; tracers are skipped.

Example
-------
    import jax
    import jax.numpy as jnp
    from advdef import defenses

    key = jax.random.key(0)
    h = jax.nn.relu(jax.random.normal(key, (128, 32, 32, 16)))
    pruned = defenses.sap(jax.random.key(1), h, frac=1.0)                # SAP-100
    # One compiled function for a whole grid of fracs (frac is traced):
    sweep = jax.jit(jax.vmap(lambda f: defenses.sap(jax.random.key(1), h, frac=f)))
    outs = sweep(jnp.array([0.25, 0.5, 1.0]))                           # [3, 128, 32, 32, 16]
    jumped = defenses.jump_relu(h, kappa=0.5, surrogate='relu')         # BPDA backward pass
    noisy = defenses.gaussian_noise(jax.random.key(2), h, sigma=0.1)
    mean_probs, per_draw = defenses.mc_probabilities(logits_fn, key, x, num_draws=100)

How `sap` samples (exact, and fast on CPU)
------------------------------------------
A Gumbel-max categorical (`jax.random.categorical(shape=(r,))`) costs O(r * n) per example, far
too slow at SAP-100. `sap` instead draws by inverse CDF on an integer (fixed-point) CDF with a
guide table, which is exact and O(n + r * log(max bucket size)):

1. Weights w_j = floor(|x_j| * (2^30 - 2^20) / sum|x|) are cumulated in int32, exactly, and
   remapped monotonically so the total is exactly 2^30: C_0 <= ... <= C_{n-1} = 2^30. Units with
   x_j = 0 get an empty interval [C_{j-1}, C_j), so they can never be drawn.
2. Each draw is u = (32 random bits) >> 2, exactly uniform on [0, 2^30); the unit drawn is
   #{j : C_j <= u}. A guide table (how many C_j fall at or below each of M = 2^ceil(log2 n)
   equal buckets of [0, 2^30)) gives a start index, and a branchless binary search finishes
   in ceil(log2(1 + most units in one bucket)) steps (about 5 for post-ReLU maps).
3. The r draws of an example are i.i.d., so this is exactly sampling with replacement from the
   categorical whose probabilities are the fixed-point weights: p_j is resolved to about 2^-30
   of the example's total mass (float32 inverse-CDF sampling resolves only ~2^-24), and units
   with p_j below ~2^-30 are never drawn. The rescaling 1 / (1 - (1 - p)^r) uses the float p.

With a traced `frac`, shapes cannot depend on r, so `sap` always draws R_max = floor(max_frac * n)
uniforms per example and uses the first r (exact, since draws are i.i.d.); `max_frac` defaults
to `frac` when it is concrete and to 1.0 when it is traced, and r is clipped to R_max. The
draws of example b come from row b's stream of the key (`random_words.row_words`: Threefry
counters (block, b), both 32-bit words of each block, half the hashing of `jax.random.bits`)
and are prefix-stable, and the fixed-point weights use a sum with a fixed association order,
so the kept set for a key is bit-reproducible: `vmap` over a frac grid (or over keys) equals a
loop over the same grid, under `jit` or not. (Values are bit-identical too when x is passed as
an argument; XLA's constant folder rounds log1p/expm1 differently from compiled kernels when x
is a closed-over constant.)

Cost (scripts/bench_sap.py, 2-core CPU, forward + backward of one 16 x 32 x 32 post-ReLU layer
at batch 128): about 35-60 ms, against about 1 ms for the ReLU and 18-26 ms for a 3 x 3 16->16
convolution on the same tensor; float32 inverse CDF with `jnp.searchsorted` takes about 80 ms,
a binomial-splitting tree about 430 ms, and the Gumbel categorical is infeasible. A ResNet-20
with SAP-100 after its 19 ReLUs: 3.9x the undefended forward + backward (scripts/benchmark.py
--quick, batch 8, 2026-11-28; 4.2x before the random words used both halves of each Threefry
block). Where a site's time goes (32 x 32 x 32 x 16, batch 32, about 19 ms): taking out the
binary search saves about half, the scatter of hits a fifth, the random words a sixth (before
that change). The search runs 4-5 dependent gathers per draw: runs of ReLU zeros share one
CDF value, so the fullest guide bucket holds 14-17 units; a guide table 2x or 4x finer left
that unchanged (and ran slower), and compacting the zeros out costs another cumsum and scatter.
Profiled again on 2026-11-29 (8 x 32 x 32 x 16, 4.4 ms): guide table 1.4 ms, search 1.6 ms, the
rest 1.5 ms. Slower inside ResNet-20 although faster alone, so not adopted: cumsum blocks of 8
or 64, integer guide counts. `rbg`/`unsafe_rbg` keys' bits cost 2.3-3x the Threefry words here.

Compile time: XLA:CPU compiles every fusion of the sampler as its own LLVM module, about 60
of them per site, so a site costs about 1.2 s of compiling, inlined at every site of every
program (the quick start's SAP programs compile in 4-11 s each). Per-example streams as
Threefry counters (block, b) of one key, instead of a vmapped `fold_in` per example (a rolled
Threefry loop with its own kernels), took the compile of one site's gradient (64 x 8 x 8 x 32)
from 1.38 to 1.26 s, medians of 4 alternating compiles in one process, run time unchanged
(4.9 vs 5.0 ms; 2026-11-29, 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from advdef import validate
from advdef.random_words import random_words as _random_words
from advdef.random_words import row_words as _row_words
from advdef.random_words import standard_normal as _standard_normal

__all__ = [
    'sap', 'sap_bernoulli', 'jump_relu', 'gaussian_noise', 'mc_probabilities', 'mc_predict',
    'per_draw_accuracy_interval', 'check_positive', 'check_nonnegative', 'SAP_GRADIENTS',
    'SAP_BPDA_GRADIENT', 'JUMP_SURROGATES',
]

SAP_GRADIENTS = ('constant', 'through_scale')  # SAP's own gradient, as implementations differ
SAP_BPDA_GRADIENT = 'identity'  # BPDA's backward pass (a surrogate, not SAP's gradient)
JUMP_SURROGATES = (None, 'relu', 'sigmoid')

_ONE = 1 << 30            # Fixed-point total mass of one example's categorical.
_MAX_UNITS = 1 << 24      # Guide counts are cumulated in float32, exact below 2^24.
_CHUNK_ELEMENTS = 1 << 19  # Rows per sampler chunk ~ this many units (measured best on CPU).
_P_MAX = 1.0 - 2.0**-24   # Largest p below 1: keeps d/dp log1p(-p) finite.


# ------------------------------------------------------------------------------------------
# Hyperparameter checks.


def check_positive(name: str, value) -> None:
  """Raises ValueError naming `name` unless every entry of a concrete `value` is > 0 (not NaN).

  Tracers (values under `jit`/`vmap`) are not checked, so traced hyperparameter grids work.
  """
  validate.check_hyperparameter(name, value, strict=True)


def check_nonnegative(name: str, value) -> None:
  """Like check_positive, for >= 0."""
  validate.check_hyperparameter(name, value, strict=False)


def _check_choice(name: str, value, choices):
  validate.check_choice(name, value, choices)


# ------------------------------------------------------------------------------------------
# SAP: exact sampler internals.


def _block_cumsum(x: jax.Array, block: int) -> jax.Array:
  """Inclusive cumsum along the last axis of [..., nb, block] by log-step shifted adds."""
  shift = 1
  while shift < block:
    pad = [(0, 0)] * (x.ndim - 1) + [(shift, 0)]
    x = x + jnp.pad(x[..., :-shift], pad)
    shift *= 2
  return x


def _exact_cumsum(w: jax.Array, *, block: int = 16) -> jax.Array:
  """Exact inclusive cumsum of int32 rows [k, n] (integer adds; XLA's cumsum is slower on CPU)."""
  k, n = w.shape
  pad = -n % block
  if pad:
    w = jnp.pad(w, ((0, 0), (0, pad)))
  inner = _block_cumsum(w.reshape(k, -1, block), block)
  totals = inner[:, :, -1]
  offsets = jnp.cumsum(totals, axis=1) - totals
  return (inner + offsets[:, :, None]).reshape(k, -1)[:, :n]


def _count_cumsum(h: jax.Array, *, block: int = 64) -> jax.Array:
  """Exact inclusive cumsum of small nonnegative integer counts held in float32 rows [k, m].

  A matmul with a triangular block of ones; exact because every partial sum is an integer
  below 2^24.
  """
  k, m = h.shape
  pad = -m % block
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad)))
  tri = jnp.triu(jnp.ones((block, block), jnp.float32))
  inner = jnp.einsum('kbi,ij->kbj', h.reshape(k, -1, block), tri, precision='highest')
  totals = inner[:, :, -1]
  offsets = jnp.cumsum(totals, axis=1) - totals
  return (inner + offsets[:, :, None]).reshape(k, -1)[:, :m].astype(jnp.int32)


def _tree_sum(a: jax.Array) -> jax.Array:
  """float32[k, 1] row sums of a [k, n] by a fixed pairwise tree of adds.

  Each level adds two strided slices, so the rounding is the same in every compilation
  context (jit or eager, batched or not, constant-folded or not), unlike `jnp.sum`, whose
  association order XLA chooses per kernel. SAP's fixed-point weights depend on this total,
  so the kept set for a given key is reproducible bit for bit.
  """
  k, n = a.shape
  size = 1 << max(int(math.ceil(math.log2(n))), 0)
  if size != n:
    a = jnp.pad(a, ((0, 0), (0, size - n)))
  while a.shape[1] > 1:
    pairs = a.reshape(k, -1, 2)
    a = pairs[:, :, 0] + pairs[:, :, 1]
  return a


def _sap_hits_chunk(a: jax.Array, key: jax.Array, row_ids: jax.Array, num_draws: jax.Array, *,
                    max_draws: int) -> jax.Array:
  """Which units are drawn at least once, for a chunk of examples.

  Args:
    a: float32[k, n] >= 0, the unnormalised probabilities |x| of k examples.
    key: the typed key of the whole batch.
    row_ids: int32[k], the examples' indices in the batch: example b draws from row b's stream
      (`random_words.row_words`).
    num_draws: int32 scalar r <= max_draws; draws with index >= r are ignored.
    max_draws: static R_max, the number of uniforms drawn per example.

  Returns:
    bool[k, n]: unit j of example b was drawn at least once among the first r draws.
  """
  k, n = a.shape
  total = _tree_sum(a)
  # Fixed-point weights; 2^20 of headroom keeps their sum <= 2^30 despite float rounding.
  w = jnp.floor(a * ((_ONE - (1 << 20)) / jnp.where(total > 0, total, 1.0))).astype(jnp.int32)
  s = _exact_cumsum(w)
  w_total = s[:, -1:]
  # Monotone integer remap of the cumsum onto total 2^30 (so draws are plain shifted bits);
  # equal partial sums (zero units) stay equal, and the last positive unit ends at 2^30.
  delta = (_ONE - w_total).astype(jnp.float32) / jnp.maximum(w_total, 1).astype(jnp.float32)
  cdf = jnp.where(s >= w_total, _ONE,
                  s + jnp.floor(s.astype(jnp.float32) * delta).astype(jnp.int32))
  # Guide table over M equal buckets of [0, 2^30): first[k] = #{j : cdf_j <= k * 2^shift}.
  log_m = max(int(math.ceil(math.log2(n))), 0)
  num_buckets, shift = 1 << log_m, 30 - log_m
  rows = jnp.arange(k, dtype=jnp.int32)[:, None]
  bucket_of_unit = (cdf + ((1 << shift) - 1)) >> shift          # ceil(cdf / 2^shift) <= M
  # Units in bucket M only matter for first[M], which no draw reads: drop them.
  slot = jnp.where(bucket_of_unit < num_buckets, bucket_of_unit + rows * num_buckets,
                   k * num_buckets)
  hist = jnp.zeros((k * num_buckets,), jnp.float32).at[slot.ravel()].add(
      1.0, mode='drop').reshape(k, num_buckets)
  first = _count_cumsum(hist)
  # Binary-search steps: a draw in bucket b lands within the units whose bucket is b + 1 (for
  # the last bucket, up to the last unit with positive weight; trailing zeros never win).
  end = jnp.sum(s < w_total, axis=1) + 1                         # last positive unit + 1
  last_span = jnp.where(w_total[:, 0] > 0, end - first[:, -1], 0)
  span = jnp.maximum(jnp.max(hist[:, 1:], initial=0.0), jnp.max(last_span).astype(jnp.float32))
  steps = jnp.ceil(jnp.log2(span + 1.0)).astype(jnp.int32)
  # Draws: example b uses its own stream, prefix-stable in max_draws.
  # half = ceil(n / 2), fixed by n: the stream is prefix-stable in max_draws (frac traced or not).
  u = (_row_words(key, row_ids, max_draws, -(-n // 2)) >> 2).astype(jnp.int32)  # [0, 2^30)
  base = first.ravel()[(u >> shift) + rows * num_buckets]
  cdf_flat, row_start = cdf.ravel(), rows * n

  # All steps run inside one while loop: its operands (cdf, u) are materialised once, whereas
  # unrolled steps would let XLA recompute them inside every gather fusion (much slower).
  def step(state):
    base, t, cdf_flat, u = state
    stride = jnp.left_shift(1, t)
    probe = cdf_flat[jnp.minimum(base + stride - 1, n - 1) + row_start]
    return jnp.where(probe <= u, base + stride, base), t - 1, cdf_flat, u

  base = lax.while_loop(lambda s: s[1] >= 0, step, (base, steps - 1, cdf_flat, u))[0]
  valid = jnp.arange(max_draws, dtype=jnp.int32)[None, :] < num_draws
  flat = jnp.where(valid, base + row_start, k * n)               # k * n: dropped below
  return jnp.zeros((k * n,), jnp.bool_).at[flat.ravel()].set(True, mode='drop').reshape(k, n)


def _sap_hits(key: jax.Array, a: jax.Array, num_draws: jax.Array, max_draws: int) -> jax.Array:
  """bool[B, n] hit indicators of SAP's draws; rows are processed in cache-sized chunks."""
  batch, n = a.shape
  rows = max(1, min(batch, _CHUNK_ELEMENTS // max(n, max_draws)))
  num_chunks = -(-batch // rows)
  pad = num_chunks * rows - batch
  if pad:  # Zero rows draw nothing that is kept; their streams are never used by real rows.
    a = jnp.pad(a, ((0, pad), (0, 0)))
  row_ids = jnp.arange(num_chunks * rows, dtype=jnp.int32)
  fn = lambda args: _sap_hits_chunk(args[0], key, args[1], num_draws, max_draws=max_draws)
  if num_chunks == 1:
    hits = fn((a, row_ids))
  else:
    hits = lax.map(fn, (a.reshape(num_chunks, rows, n), row_ids.reshape(num_chunks, rows)))
  return hits.reshape(-1, n)[:batch]


def _num_draws(frac, n: int) -> jax.Array:
  """r = floor(frac * n) in float32 arithmetic (identical for concrete and traced frac)."""
  return jnp.floor(jnp.asarray(frac, jnp.float32) * jnp.float32(n)).astype(jnp.int32)


def _keep_probability(p: jax.Array, r: jax.Array) -> jax.Array:
  """1 - (1 - p)^r without cancellation: -expm1(r * log1p(-p)); p is clipped below 1."""
  return -jnp.expm1(r.astype(jnp.float32) * jnp.log1p(-jnp.minimum(p, _P_MAX)))


def _rescale(x: jax.Array, keep: jax.Array, p: jax.Array, q: jax.Array, gradient: str):
  """x * keep / q with the requested gradient; finite everywhere (q is only inverted if kept).

  keep, p and q are [B, n]; x is [B, ...] and the result has x's shape and dtype.
  """
  keep = keep & (q > 0)
  scale = jnp.where(keep, 1.0 / jnp.where(keep, q, 1.0), 0.0)
  xf = x.reshape(keep.shape).astype(jnp.float32)
  if gradient == 'constant':
    out = xf * lax.stop_gradient(scale)
  elif gradient == 'identity':  # BPDA: SAP's values forward (bit for bit), identity backward.
    out = lax.stop_gradient(xf * scale) + (xf - lax.stop_gradient(xf))
  else:  # 'through_scale': the kept set is constant, the scale follows p(x).
    out = xf * scale
  return out.reshape(x.shape).astype(x.dtype)


def _flat_probs(x: jax.Array):
  """(|x| as float32[B, n], p = |x| / sum|x| with all-zero rows mapped to p = 0)."""
  a = jnp.abs(x.reshape(x.shape[0], -1)).astype(jnp.float32)
  total = _tree_sum(a)
  p = a / jnp.where(total > 0, total, 1.0)
  return a, p


def sap(key: jax.Array, x: jax.Array, *, frac=1.0, gradient: str = 'constant',
        max_frac: float | None = None) -> jax.Array:
  """Stochastic Activation Pruning (Dhillon et al. 2018, Algorithm 1), exact.

  Per example, over all of its n = prod(x.shape[1:]) units: p = |x| / sum|x|; draw
  r = floor(frac * n) unit indices i.i.d. from Categorical(p) (with replacement); a unit drawn at
  least once is kept and scaled by 1 / (1 - (1 - p)^r), all others become 0, so that
  E[sap(x)] = x. See the module docstring for the sampler and its resolution (~2^-30 of the
  example's mass).

  Args:
    key: typed PRNG key. Example b uses row b's stream of it (`random_words.row_words`), so its
      draws do not depend on the batch size or the other examples.
    x: float[B, ...] activations (SAP sits after a ReLU, but |x| makes any sign valid).
    frac: draws as a fraction of n ("SAP-100" is frac = 1.0); > 0, may be traced (then r is
      clipped to floor(max_frac * n)). frac < 1 / n draws nothing and returns zeros.
    gradient: 'constant' (default, the authors' MXNet operator): the gradient is the mask,
      out = x * stop_gradient(mask). 'through_scale' (the authors' TF port, Athalye et al.): the
      kept set is constant but the scale 1 / (1 - (1 - p)^r) is differentiated through p(x).
      'identity': BPDA (Athalye et al. 2018; Dhillon & Carlini 2020), the same values with
      the identity as backward pass (SAP is unbiased, E[sap(x)] = x).
    max_frac: static bound on frac that fixes the number of uniforms drawn per example,
      R_max = floor(max_frac * n); defaults to frac when frac is concrete and to 1.0 when it is
      traced. The cost grows with R_max, not with r.

  Returns:
    Array like x: the pruned and rescaled activations. p = 0 units (and all-zero examples)
    give exactly 0; values and gradients are finite everywhere.
  """
  check_positive('frac', frac)
  _check_choice('gradient', gradient, SAP_GRADIENTS + (SAP_BPDA_GRADIENT,))
  if x.ndim < 2:
    raise ValueError(f'x must have a batch axis, shape [B, ...]; got shape {x.shape}')
  n = math.prod(x.shape[1:])
  if n >= _MAX_UNITS:
    raise ValueError(f'sap supports fewer than 2^24 units per example, got {n}')
  if max_frac is None:
    max_frac = float(frac) if not validate.is_traced(frac) and np.ndim(frac) == 0 else 1.0
  else:
    if validate.is_traced(max_frac):
      raise ValueError('max_frac must be a static Python number (it fixes a shape), got a tracer')
    check_positive('max_frac', max_frac)
    if not validate.is_traced(frac) and np.any(np.asarray(frac) > max_frac):
      raise ValueError(f'frac={frac!r} exceeds max_frac={max_frac!r}')
  max_draws = int(np.floor(np.float32(max_frac) * np.float32(n)))
  a, p = _flat_probs(x)
  r = jnp.minimum(_num_draws(frac, n), max_draws)
  if max_draws == 0:
    return (x * 0).astype(x.dtype)
  hits = _sap_hits(key, lax.stop_gradient(a), r, max_draws)
  q = _keep_probability(p, r)
  return _rescale(x, hits, p, q, gradient)


def sap_bernoulli(key: jax.Array, x: jax.Array, *, frac=1.0,
                  gradient: str = 'through_scale') -> jax.Array:
  """Athalye et al.'s independent-Bernoulli approximation of SAP, kept for comparison.

  Keeps unit j independently with probability q_j = 1 - exp(-r * p_j) (r = floor(frac * n),
  p = |x| / sum|x| per example) and scales kept units by 1 / q_j. This is not SAP: exact SAP's
  keep indicators are negatively dependent (r draws are shared among the units), so its number
  of distinct kept units has a smaller variance, and its marginals are 1 - (1 - p)^r rather than
  1 - exp(-r p) (they differ for large p). Athalye et al. divide by q + 1e-8; dividing by q on
  kept units only is exactly unbiased and finite (q > 0 whenever a unit can be kept).

  Args:
    key: typed PRNG key.
    x: float[B, ...].
    frac: > 0, may be traced.
    gradient: 'through_scale' (default, as Athalye et al.) or 'constant'; see `sap`.

  Returns:
    Array like x.
  """
  check_positive('frac', frac)
  _check_choice('gradient', gradient, SAP_GRADIENTS + (SAP_BPDA_GRADIENT,))
  if x.ndim < 2:
    raise ValueError(f'x must have a batch axis, shape [B, ...]; got shape {x.shape}')
  n = math.prod(x.shape[1:])
  _, p = _flat_probs(x)
  r = _num_draws(frac, n).astype(jnp.float32)
  q = -jnp.expm1(-r * p)
  keep = jax.random.uniform(key, p.shape) < lax.stop_gradient(q)
  return _rescale(x, keep, p, q, gradient)


# ------------------------------------------------------------------------------------------
# JumpReLU.


def _jump_forward(x, kappa):
  return jnp.where(x > kappa, x, jnp.zeros_like(x))


def _smooth_jump(x, kappa, temperature):
  """The sigmoid surrogate x * sigmoid((x - kappa) / temperature) of x * 1[x > kappa]."""
  return x * jax.nn.sigmoid((x - kappa) / temperature)


@jax.custom_vjp
def _jump_relu_bpda_relu(x, kappa):
  return _jump_forward(x, kappa)


def _bpda_relu_fwd(x, kappa):
  return _jump_forward(x, kappa), (x, kappa)


def _bpda_relu_bwd(res, g):
  x, kappa = res
  # ReLU's gradient 1[x > 0]; nothing reaches kappa.
  return jnp.where(x > 0, g, jnp.zeros_like(g)), jnp.zeros_like(kappa)


_jump_relu_bpda_relu.defvjp(_bpda_relu_fwd, _bpda_relu_bwd)


@jax.custom_vjp
def _jump_relu_bpda_sigmoid(x, kappa, temperature):
  return _jump_forward(x, kappa)


def _bpda_sigmoid_fwd(x, kappa, temperature):
  return _jump_forward(x, kappa), (x, kappa, temperature)


def _bpda_sigmoid_bwd(res, g):
  x, kappa, temperature = res
  # The surrogate's own VJP, so the backward pass is exactly jax.grad of the smooth function.
  _, vjp = jax.vjp(lambda x: _smooth_jump(x, kappa, temperature), x)
  return vjp(g)[0], jnp.zeros_like(kappa), jnp.zeros_like(temperature)


_jump_relu_bpda_sigmoid.defvjp(_bpda_sigmoid_fwd, _bpda_sigmoid_bwd)


def jump_relu(x: jax.Array, *, kappa, surrogate: str | None = None,
              temperature=None) -> jax.Array:
  """JumpReLU (Erichson et al. 2019): x * 1[x > kappa], exactly 0 at x == kappa.

  Args:
    x: float array.
    kappa: jump size >= 0 in activation units (kappa = 0 is ReLU); a scalar or an array
      broadcastable against x with the same rank; may be traced.
    surrogate: the backward pass.
      None: the exact a.e. gradient 1[x > kappa] (white-box).
      'relu': BPDA, forward exact, backward ReLU's gradient 1[x > 0].
      'sigmoid': BPDA, forward exact, backward the derivative of the smooth approximation
        x * sigmoid((x - kappa) / temperature).
      Surrogates send no gradient to kappa or temperature.
    temperature: > 0, the sigmoid surrogate's width in activation units (required for
      'sigmoid'; smaller is closer to the jump). May be traced.

  Returns:
    Array like x.
  """
  check_nonnegative('kappa', kappa)
  _check_choice('surrogate', surrogate, JUMP_SURROGATES)
  kappa = jnp.asarray(kappa, x.dtype)
  if surrogate is None:
    return _jump_forward(x, kappa)
  if surrogate == 'relu':
    return _jump_relu_bpda_relu(x, kappa)
  check_positive('temperature', temperature)
  return _jump_relu_bpda_sigmoid(x, kappa, jnp.asarray(temperature, x.dtype))


# ------------------------------------------------------------------------------------------
# RSE noise layer.


def gaussian_noise(key: jax.Array, x: jax.Array, *, sigma) -> jax.Array:
  """The RSE noise layer: x + sigma * N(0, I), drawn fresh per call (train and test).

  Args:
    key: typed PRNG key.
    x: float array.
    sigma: standard deviation >= 0 in x's units (a scalar or an array broadcastable against x
      with the same rank); may be traced. sigma = 0 returns x exactly.

  Returns:
    Array like x.
  """
  check_nonnegative('sigma', sigma)
  return x + jnp.asarray(sigma, x.dtype) * _standard_normal(key, x.shape, x.dtype)


# ------------------------------------------------------------------------------------------
# Monte-Carlo inference.


def mc_probabilities(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array,
                     x: jax.Array, *, num_draws: int,
                     chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax probabilities of a stochastic model over `num_draws` independent draws.

  Draw d evaluates `logits_fn(x, keys[d])` with `keys = jax.random.split(key, num_draws)`,
  vectorised with `jax.vmap` (no Python loop).

  Args:
    logits_fn: `logits_fn(x, key) -> float[B, K]`.
    key: typed PRNG key.
    x: the model input, batch first.
    num_draws: static number of draws D >= 1.
    chunk_size: static; if set, draws are evaluated `chunk_size` at a time (`lax.map` over
      chunks, vmap inside), bounding memory to chunk_size copies of the activations. D need
      not be a multiple of it.

  Returns:
    (mean_probs float32[B, K], per_draw_probs float32[D, B, K]).
  """
  if not isinstance(num_draws, int) or num_draws < 1:
    raise ValueError(f'num_draws must be a positive int, got {num_draws!r}')
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f'chunk_size must be None or a positive int, got {chunk_size!r}')
  keys = jax.random.split(key, num_draws)
  probs_fn = lambda k: jax.nn.softmax(logits_fn(x, k).astype(jnp.float32), axis=-1)
  if chunk_size is None or chunk_size >= num_draws:
    per_draw = jax.vmap(probs_fn)(keys)
  else:
    per_draw = lax.map(probs_fn, keys, batch_size=chunk_size)
  return jnp.mean(per_draw, axis=0), per_draw


def mc_predict(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array,
               x: jax.Array, *, num_draws: int, chunk_size: int | None = None) -> jax.Array:
  """int32[B]: argmax of the mean softmax over `num_draws` draws (see `mc_probabilities`)."""
  mean_probs, _ = mc_probabilities(logits_fn, key, x, num_draws=num_draws,
                                   chunk_size=chunk_size)
  return jnp.argmax(mean_probs, axis=-1).astype(jnp.int32)


def per_draw_accuracy_interval(correct_per_draw, mask=None) -> dict[str, Any]:
  """Mean single-draw accuracy with a 95% Student-t interval over draws (host-side, numpy).

  The per-draw accuracy a_d = sum_b mask_b correct_{d,b} / sum_b mask_b is computed for each
  draw; the draws are i.i.d. given the evaluated examples, so a t-interval over the D values
  a_d is valid without assuming independence across examples (a Wilson interval on the
  pooled D * N counts would treat the same example's D outcomes as independent). The interval
  therefore measures the Monte-Carlo error of the mean over draws on these examples; the
  sampling error of the test set itself is not included (use a binomial interval over
  examples for that).

  Args:
    correct_per_draw: bool or int [D, B], 1 where draw d classifies example b correctly.
    mask: bool [B] of real (non-padding) examples; default all.

  Returns:
    dict(mean, ci95_low, ci95_high, std (over draws, ddof=1), num_draws, num_examples);
    the bounds are NaN when D = 1, and everything is NaN when there are no examples.
  """
  correct = np.asarray(correct_per_draw, dtype=np.float64)
  if correct.ndim != 2:
    raise ValueError(f'correct_per_draw must be [D, B], got shape {correct.shape}')
  num_draws, batch = correct.shape
  mask = np.ones(batch, bool) if mask is None else np.asarray(mask, bool)
  if mask.shape != (batch,):
    raise ValueError(f'mask must have shape ({batch},), got {mask.shape}')
  num_examples = int(mask.sum())
  nan = float('nan')
  if num_examples == 0 or num_draws == 0:
    return dict(mean=nan, ci95_low=nan, ci95_high=nan, std=nan, num_draws=num_draws,
                num_examples=num_examples)
  acc = correct[:, mask].mean(axis=1)
  mean = float(acc.mean())
  if num_draws == 1:
    return dict(mean=mean, ci95_low=nan, ci95_high=nan, std=nan, num_draws=1,
                num_examples=num_examples)
  from scipy import stats  # Lazy: only this host-side helper needs scipy.
  std = float(acc.std(ddof=1))
  half = float(stats.t.ppf(0.975, num_draws - 1)) * std / math.sqrt(num_draws)
  return dict(mean=mean, ci95_low=mean - half, ci95_high=mean + half, std=std,
              num_draws=num_draws, num_examples=num_examples)
