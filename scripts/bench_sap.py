"""Times exact SAP samplers against ReLU, a 3x3 conv and a ResNet-20 (forward + backward, CPU).

Usage:
  python scripts/bench_sap.py                 # all candidates, batch 128, one 16x32x32 layer
  python scripts/bench_sap.py --skip-slow     # leave out the O(r * n) and sort-based samplers
  python scripts/bench_sap.py --no-resnet

Every function is jitted, warmed up once, then timed `--reps` times in interleaved rounds (so
load from other processes hits all candidates alike); the table gives the minimum and median
wall time and the minimum process CPU time (all threads) in milliseconds. "fwd+bwd" is
`jax.grad` of `sum(f(x) * v)` with respect to x, the pass an attack runs.

Candidates (all exact samplers of r = n draws with replacement, except sap_bernoulli):
  sap (guide table)   advdef.defenses.sap: integer inverse CDF + guide table (the chosen one).
  searchsorted-scan   float32 inverse CDF: cumsum(p), uniforms, jnp.searchsorted 'scan'.
  searchsorted-sort   the same with method='sort'.
  binomial tree       multinomial counts by log2(n) levels of jax.random.binomial splits.
  gumbel categorical  jax.random.categorical(shape=(r,)) per example: O(r * n); timed on one
                      example and multiplied by the batch size (marked "x B").
  sap_bernoulli       the independent-Bernoulli approximation, for scale.
"""

import argparse
import math
import os
import sys
import time

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from advdef import defenses  # noqa: E402


def _timeit(fns: dict, reps: int):
  jitted = {k: jax.jit(f) for k, (f, _) in fns.items()}
  for k, f in jitted.items():
    jax.block_until_ready(f(*fns[k][1]))
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in jitted.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(f(*fns[k][1]))
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  return {k: (1e3 * min(wall[k]), 1e3 * float(np.median(wall[k])), 1e3 * min(cpu[k]))
          for k in fns}


def _fwd_bwd(fn):
  """(key, x, v) -> d/dx sum(fn(key, x) * v)."""
  return lambda key, x, v: jax.grad(lambda x: jnp.sum(fn(key, x) * v))(x)


def _rescale(x, hits, r):
  b = x.shape[0]
  a = jnp.abs(x.reshape(b, -1))
  tot = jnp.sum(a, axis=1, keepdims=True)
  p = jnp.minimum(a / jnp.where(tot > 0, tot, 1.0), 1 - 2.0**-24)
  q = -jnp.expm1(r * jnp.log1p(-p))
  keep = hits & (q > 0)
  mask = jnp.where(keep, 1 / jnp.where(keep, q, 1.0), 0.0)
  return x * lax.stop_gradient(mask.reshape(x.shape))


def sap_searchsorted(key, x, method='scan'):
  b = x.shape[0]
  a = lax.stop_gradient(jnp.abs(x.reshape(b, -1)))
  n = a.shape[1]
  cdf = jnp.cumsum(a, axis=1)
  u = jax.random.uniform(key, (b, n)) * cdf[:, -1:]
  idx = jax.vmap(lambda c, u: jnp.searchsorted(c, u, side='right', method=method))(cdf, u)
  hits = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], jnp.minimum(idx, n - 1)].set(True)
  return _rescale(x, hits, n)


def sap_binomial_tree(key, x):
  b = x.shape[0]
  a = lax.stop_gradient(jnp.abs(x.reshape(b, -1)))
  n = a.shape[1]
  depth = int(math.ceil(math.log2(n)))
  masses = [jnp.pad(a, ((0, 0), (0, 2**depth - n)))]
  for _ in range(depth):
    masses.append(masses[-1].reshape(b, -1, 2).sum(-1))
  counts = jnp.full((b, 1), float(n))
  for level, k in enumerate(jax.random.split(key, depth)):
    child = masses[depth - level - 1].reshape(b, -1, 2)
    parent = child.sum(-1)
    p_left = jnp.where(parent > 0, child[..., 0] / jnp.where(parent > 0, parent, 1.0), 0.0)
    left = jax.random.binomial(k, counts, jnp.clip(p_left, 0.0, 1.0))
    counts = jnp.stack([left, counts - left], -1).reshape(b, -1)
  return _rescale(x, counts[:, :n] > 0, n)


def sap_gumbel(key, x):
  b = x.shape[0]
  a = lax.stop_gradient(jnp.abs(x.reshape(b, -1)))
  n = a.shape[1]
  logp = jnp.log(a / jnp.sum(a, axis=1, keepdims=True))
  keys = jax.random.split(key, b)
  idx = jax.vmap(lambda k, l: jax.random.categorical(k, l, shape=(n,)))(keys, logp)
  hits = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], idx].set(True)
  return _rescale(x, hits, n)


def _conv(x, w, stride=1):
  return lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def init_resnet20(key, num_classes=10):
  """Pre-activation ResNet-20 (3 stages x 3 units, 16/32/64 filters) as in the SAP notebook."""
  keys = iter(jax.random.split(key, 64))
  he = lambda shape: jax.random.normal(next(keys), shape) * math.sqrt(2 / math.prod(shape[:3]))
  params = {'conv0': he((3, 3, 3, 16)), 'units': []}
  c_in = 16
  for c_out, stride in [(16, 1), (32, 2), (64, 2)]:
    for i in range(3):
      s = stride if i == 0 else 1
      unit = {'bn1': (jnp.ones(c_in), jnp.zeros(c_in)), 'conv1': he((3, 3, c_in, c_out)),
              'bn2': (jnp.ones(c_out), jnp.zeros(c_out)), 'conv2': he((3, 3, c_out, c_out)),
              'stride': s}
      if s != 1 or c_in != c_out:
        unit['proj'] = he((1, 1, c_in, c_out))
      params['units'].append(unit)
      c_in = c_out
  params['bn'] = (jnp.ones(64), jnp.zeros(64))
  params['fc'] = jax.random.normal(next(keys), (64, num_classes)) * 0.1
  return params


def resnet20(params, x, key, act):
  """Logits; act(key, h) is applied after each of the 19 BN -> ReLU sites (eval-mode BN)."""
  site = iter(range(19))
  bn = lambda h, gb: h * gb[0] + gb[1]
  h = _conv(x, params['conv0'])
  for unit in params['units']:
    a = act(jax.random.fold_in(key, next(site)), jax.nn.relu(bn(h, unit['bn1'])))
    r = _conv(a, unit['conv1'], unit['stride'])
    r = act(jax.random.fold_in(key, next(site)), jax.nn.relu(bn(r, unit['bn2'])))
    r = _conv(r, unit['conv2'])
    h = r + (_conv(a, unit['proj'], unit['stride']) if 'proj' in unit else h)
  h = act(jax.random.fold_in(key, next(site)), jax.nn.relu(bn(h, params['bn'])))
  return jnp.mean(h, axis=(1, 2)) @ params['fc']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--skip-slow', action='store_true')
  parser.add_argument('--no-resnet', action='store_true')
  args = parser.parse_args()
  b = args.batch
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  x = jax.nn.relu(jax.random.normal(k1, (b, 32, 32, 16)))
  v = jax.random.normal(k2, x.shape)
  w = jax.random.normal(k3, (3, 3, 16, 16)) * 0.1
  key = jax.random.key(1)
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); '
        f'one layer x = relu(N(0, 1)) of shape {x.shape} ({math.prod(x.shape[1:])} units, '
        f'{float((x > 0).mean()):.0%} nonzero)')
  fns = {
      'relu': (lambda x, v: jax.grad(lambda x: jnp.sum(jax.nn.relu(x) * v))(x), (x, v)),
      'conv3x3 16->16': (lambda x, w, v: jax.grad(lambda x, w: jnp.sum(_conv(x, w) * v),
                                                  (0, 1))(x, w), (x, w, v)),
      'sap (guide table)': (_fwd_bwd(defenses.sap), (key, x, v)),
      'sap through_scale': (_fwd_bwd(lambda k, x: defenses.sap(k, x, gradient='through_scale')),
                            (key, x, v)),
      'sap_bernoulli': (_fwd_bwd(defenses.sap_bernoulli), (key, x, v)),
      'searchsorted-scan': (_fwd_bwd(sap_searchsorted), (key, x, v)),
      'binomial tree': (_fwd_bwd(sap_binomial_tree), (key, x, v)),
  }
  table = _timeit(fns, args.reps)
  if not args.skip_slow:
    slow = {'searchsorted-sort': (_fwd_bwd(lambda k, x: sap_searchsorted(k, x, 'sort')),
                                  (key, x, v)),
            'gumbel categorical (x B)': (_fwd_bwd(sap_gumbel), (key, x[:1], v[:1]))}
    for name, row in _timeit(slow, 2).items():
      table[name] = tuple(t * b for t in row) if '(x B)' in name else row
  print(f'\nforward+backward, batch {b}            wall min   wall med    cpu min  (ms)')
  for name, (wmin, wmed, cmin) in table.items():
    print(f'  {name:34s} {wmin:9.2f} {wmed:10.2f} {cmin:10.2f}')
  if args.no_resnet:
    return
  params = init_resnet20(k4)
  images = jax.random.uniform(k1, (b, 32, 32, 3))
  logits_v = jax.random.normal(k2, (b, 10))
  model_fns = {}
  for name, act in [('ResNet-20', lambda k, h: h),
                    ('ResNet-20 + SAP-100 x19', lambda k, h: defenses.sap(k, h)),
                    ('ResNet-20 + SAP bernoulli x19', lambda k, h: defenses.sap_bernoulli(k, h))]:
    grad = lambda key, x, act=act: jax.grad(
        lambda x: jnp.sum(resnet20(params, x, key, act) * logits_v))(x)
    model_fns[name] = (grad, (key, images))
  mt = _timeit(model_fns, max(3, args.reps // 2))
  base = mt['ResNet-20'][0]
  print(f'\nforward+backward (grad wrt input), batch {b}'
        '  wall min  wall med   cpu min  x undefended')
  for name, (wmin, wmed, cmin) in mt.items():
    print(f'  {name:34s} {wmin:9.2f} {wmed:9.2f} {cmin:9.2f} {wmin / base:8.2f}')


if __name__ == '__main__':
  main()
