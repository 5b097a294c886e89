"""advdef's benchmark suite: one run, one table, one JSON.

  python scripts/benchmark.py [--quick | --tiny] [--skip-peers] [--out FILE.json]

What it measures (advdef jitted and warmed up, against peers on the SAME architecture, batch,
float32 precision and step count):

  1 pgd      PGD-20 L-inf throughput (images/s) on ResNet-20 at CIFAR shape (32x32x3) and on
             lenet_like at MNIST shape (28x28x1): advdef vs a plain PyTorch loop, torchattacks'
             PGD, and foolbox 3.3.4 on its JAX backend (eager, the model's forward jitted).
  2 train    Training throughput (images/s) of one SGD step (momentum, weight decay, BatchNorm
             in train mode) on the same two models: advdef's `training.make_train_step` vs
             PyTorch.
  3 sap      SAP-100 forward+backward (gradient w.r.t. the input, the pass an attack runs) over
             the undefended ResNet-20; and advdef's exact SAP on one 32x32x16 layer against a
             naive host sampler like the authors' MXNet operator (numpy
             `rng.choice(n, size=r, replace=True, p=p)` per example, on the host).
  4 eot      EOT-k PGD on ResNet-20 with RSE noise: advdef's vectorised EOT (`eot_samples=k`)
             vs a sequential Python loop of k jitted gradient passes per step (how AutoAttack,
             torchattacks and foolbox do EOT), and torchattacks' EOTPGD on the same noisy model.
  5 sweep    A JumpReLU kappa sweep (10 values) in one vmapped compiled call vs 10 separately
             jitted calls (scripts/sweep_timing.py).
  6 compile  Compile time of the train step and of PGD-20 (lower+compile, and first call minus
             the steady-state median).
  8 quickstart  (not in --tiny) `python -m advdef.main --config=configs/quickstart.py` end
             to end in a subprocess, first with an empty persistent compilation cache, then
             rerun with the cache it filled; the report's compile share for both.
  3b         the SAP paper's anchor: one SAP-100 backward pass over ResNet-20 on 512
             CIFAR-10-shaped examples (the authors: about 20 s on 8 GPUs, MXNet).
  7 flops    Achieved FLOP/s of a train step and of one PGD step (FLOPs from XLA's
             `cost_analysis()` of the compiled step) as a fraction of the machine's measured
             float32 matmul peak (the best of several large matmuls in this run).
  9 loops    (diag) Per attack family, one iteration inside the attack's own compiled loop
             against the same model work jitted alone. The attack is jitted at two step
             counts S1 < S2, its other arguments equal; in_loop_step_s = (T(S2) - T(S1)) /
             (S2 - S1) seconds cancels its set-up; step_alone_s is the seconds of one call of
             the step alone; ratio = in-loop / alone (1 = the loop runs at the speed of its
             step; target <= 1.1). T is the minimum over the rounds (a difference of two
             medians of a few rounds carries the load noise of both). lenet_like b=32, S 2/12
             (quick); ResNet-20 b=32, 5/20 (full); the tiny PreActResNet b=2, 1/2 (tiny).
             Labels are the model's clean predictions, so every example starts correct.
             "Step alone", per family:
               PGD, APGD-CE, IFGSM-min, PGD-AT crafting: a gradient pass (the input gradient
                 of the summed cross-entropy) and a sign step;
               EOT-PGD: k such passes vmapped over draws of a noisy model (noise(sigma=0.1),
                 RSE's input layer: RSE's inner layers too double the compile time);
               C&W-L2: a gradient pass of the summed margin (search_steps=1, `steps` varied;
                 the loop's tanh and Adam update are elementwise);
               Square: a forward pass and the margin;
               DeepFool: a forward pass and 9 vector-Jacobian products (z_k - z_y for the 9
                 other classes, vmapped as DeepFool does), their norms and a step;
               trust_region: a forward pass and 1 vjp (z_t - z_y), its norm and a step.
             The `lax.while_loop` attacks, which stop once every example is fooled (Square,
             DeepFool, IFGSM-min, trust_region), are kept from fooling any: eps, step size and
             radius 1e-6, and DeepFool overshoot=-1, traced (below its validated range: it
             keeps x_adv = x, with the same work per iteration). Checked: an example still
             classified as y after S2 iterations means the loop ran them all. PGD-AT crafting
             is `advdef.recipes._pgd`, the call the pgd_at train step crafts with (unrolled
             on CPU, as the train step does). PGD, EOT-PGD, APGD and PGD-AT start from x
             (random_start=False; the start is set-up, and its sampler costs compile time).

Method. Every timed function is compiled (advdef) or built (peers) and run once as a warm-up;
then `repeats` rounds run every candidate of a comparison once each, in rotating order, so
load from other processes hits all candidates alike; the table reports medians (section 9:
minima). Model
parameters are arguments of the jitted functions, never closed-over constants. PyTorch runs
in a subprocess (scripts/peer_reference.py) in an isolated virtual environment with
`torch.set_num_threads` equal to the cores JAX uses; its models are checked to give advdef's
logits for advdef's weights before anything is timed. Its OpenMP threads run with
OMP_WAIT_POLICY=PASSIVE (`--torch-omp-wait-policy`): with the spinning default, PyTorch ran
10-100x slower on a 2-core machine shared with other processes. On a GPU the same script times
the GPU (results blocked on, `torch.cuda.synchronize`), with TF32 off on both sides.

Rows marked (diag) are diagnostics, not peers: the very step of advdef's PGD (or vectorised
EOT) jitted alone and called from a Python loop, which separates the cost of the step from the
cost of running it inside `lax.fori_loop`; section 9 does the same for every attack family, and
its worst ratio is the only diagnostic with a target (loops/worst).

Peers (PyTorch, torchattacks, foolbox) are installed and started by scripts/peers_setup.py
(`python scripts/peers_setup.py` prepares them ahead of a run), never into advdef's
environment. A peer that cannot be installed gets a row saying why.

Modes: full (default; for a GPU or a long run), --quick (the same comparisons at small
batches and fewer repeats; a few minutes on 2 CPU cores), --tiny (a smoke test for
tests/benchmark_test.py: PreActResNet depth 2, i.e. its stem and head without residual
units, instead of ResNet-20; batch 2; two kappas; one repeat).
Targets (ratios measured in one run) are printed as PASS/MISS; they are reported, not tuned.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Run from a checkout without installing the package.

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from advdef import compilation  # noqa: E402

compilation.prefer_eigen_convolutions()  # before any JAX computation, like advdef.main

from advdef import attacks  # noqa: E402
from advdef import defenses  # noqa: E402
from advdef import models  # noqa: E402
from advdef import recipes  # noqa: E402
from advdef import retrofit  # noqa: E402
from advdef import training  # noqa: E402

# Sibling scripts (scripts/ is not a package): Python puts this file's directory on sys.path.
import peers_setup  # noqa: E402
import sweep_timing  # noqa: E402

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
SHAPES = {'resnet20': (32, 32, 3), 'lenet_like': (28, 28, 1)}
EPS = {'resnet20': 8 / 255, 'lenet_like': 0.3}

# Sizes per mode. Every mode runs every comparison.
MODES: dict[str, dict[str, Any]] = {
    'full': dict(resnet_depth=20, pgd_steps=20, pgd_batch={'resnet20': 128, 'lenet_like': 256},
                 train_batch={'resnet20': 128, 'lenet_like': 128}, sap_batch=128,
                 sap_anchor_batch=512, quickstart='configs/quickstart.py', sap_layer_batch=128, eot_k=10, eot_batch=32, eot_steps=10,
                 sweep_examples=200, sweep_steps=10, sweep_points=10, repeats=5, matmul_n=4096,
                 loops_model='resnet20', loops_batch=32, loops_steps=(5, 20)),
    'quick': dict(resnet_depth=20, pgd_steps=20, pgd_batch={'resnet20': 32, 'lenet_like': 64},
                  train_batch={'resnet20': 32, 'lenet_like': 64}, sap_batch=8,
                  sap_anchor_batch=512, quickstart='configs/quickstart.py',
                  sap_layer_batch=16, eot_k=4, eot_batch=4, eot_steps=5, sweep_examples=64,
                  sweep_steps=5, sweep_points=10, repeats=3, matmul_n=2048,
                  loops_model='lenet_like', loops_batch=32, loops_steps=(2, 12)),
    'tiny': dict(resnet_depth=2, pgd_steps=2, pgd_batch={'resnet20': 2, 'lenet_like': 4},
                 train_batch={'resnet20': 4, 'lenet_like': 4}, sap_batch=2, sap_layer_batch=2,
                 sap_anchor_batch=4, quickstart=None,
                 eot_k=2, eot_batch=2, eot_steps=2, sweep_examples=8, sweep_steps=2,
                 sweep_points=2, repeats=1, matmul_n=256,
                 loops_model='resnet20', loops_batch=2, loops_steps=(1, 2),
                 # Four families cover the three loop kinds (fori, while, jacobian) in CI.
                 loops_families=('PGD', 'APGD-CE', 'Square', 'DeepFool')),
}

# (key, description, op, threshold). Values are ratios > 1 = advdef better, except 'sap',
# 'quickstart' (seconds) and 'loops' (in-loop step / step alone), where lower is better.
TARGETS = (
    ('pgd/resnet20', 'PGD ResNet-20 vs fastest PyTorch (plain/torchattacks)', '>=', 1.5),
    ('pgd/lenet_like', 'PGD lenet_like vs fastest PyTorch (plain/torchattacks)', '>=', 1.5),
    ('train/resnet20', 'train step ResNet-20 vs PyTorch', '>=', 1.3),
    ('train/lenet_like', 'train step lenet_like vs PyTorch', '>=', 1.3),
    ('sap/overhead', 'SAP-100 fwd+bwd time / undefended (ResNet-20)', '<=', 2.0),
    ('eot/speedup', 'vectorised EOT vs sequential loop of k passes', '>=', 1.2),
    ('sweep/speedup', 'in-graph kappa sweep vs separately jitted runs (incl. compile)', '>=',
     3.0),
    ('flops/train_fraction', 'train step FLOP/s / measured matmul peak (ResNet-20)', '>=', 0.25),
    ('quickstart/cold', 'quick start end to end, empty compilation cache (s)', '<=', 90.0),
    ('loops/worst', 'worst attack in-loop step / step alone', '<=', 1.1),
)


def log(msg: str) -> None:
  print(f'[benchmark {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def median(xs):
  return float(statistics.median(xs)) if xs else float('nan')


def ratio(a, b):
  """a / b, or None when either is missing or not positive."""
  if a is None or b is None or not (a > 0 and b > 0):
    return None
  return float(a) / float(b)


# ------------------------------------------------------------------------------------------
# Machine description.


def cpu_model() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.lower().startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      'cpu_model': cpu_model(), 'cores_available': peers_setup.num_cores(),
      'cpu_count': os.cpu_count(), 'load_average_start': list(os.getloadavg()),
      'python': platform.python_version(), 'jax': jax.__version__,
      'jaxlib': getattr(jax.lib, '__version__', None) or _dist_version('jaxlib'),
      'flax': flax.__version__, 'optax': optax.__version__, 'numpy': np.__version__,
      'backend': jax.default_backend(), 'device_kind': dev.device_kind,
      'device_count': jax.device_count(), 'platform': platform.platform(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      # True under the test suite (LLVM at -O0): generated loops about 30% slower.
      'jax_disable_most_optimizations': bool(jax.config.read('jax_disable_most_optimizations')),
  }


def _dist_version(name):
  try:
    return metadata.version(name)
  except Exception:
    return None


# ------------------------------------------------------------------------------------------
# Timing helpers.


def compile_jit(fn, *args, **kwargs):
  """(compiled, lower+compile seconds) of jax.jit-ed `fn` for these arguments."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def timer(fn: Callable[..., Any], *args) -> Callable[[], float]:
  """A candidate for `interleaved`: the seconds of one call fn(*args), blocked on."""
  return lambda: timed(lambda: fn(*args))


def warmed(candidates: dict[str, Callable[[], float]]) -> dict[str, Callable[[], float]]:
  """Runs each candidate once, in order (the untimed warm-up), and returns them."""
  for candidate in candidates.values():
    candidate()
  return candidates


def flops_of(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get('flops')
  return float(value) if value is not None and value > 0 else None


def interleaved(candidates: dict[str, Callable[[], float]], repeats: int) -> dict[str, list]:
  """Runs each candidate (a callable returning seconds) once per round, rotating the order."""
  names = list(candidates)
  times: dict[str, list] = {n: [] for n in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      times[n].append(candidates[n]())
  return times


def peer_candidate(peer: peers_setup.Peer, task_id: str) -> Callable[[], float]:
  return lambda: peer.ask(op='time', id=task_id)['seconds'][0]


def add_peer(peers, rows, candidates, name: str, label: str, task_id: str, /, extra=None,
             **setup) -> None:
  """Sets up (and warms up) a peer's task as candidate `label`; if it cannot, its row says why.

  `name` is the peer whose status counts; torch and torchattacks both run in the torch server.
  """
  if not peers.usable(name):
    rows[label] = {'status': peers.why_not(name)}
    return
  peer = peers.foolbox if name == 'foolbox' else peers.torch
  try:
    out = peer.ask(op='setup', id=task_id, **setup)
    rows[label] = {'status': 'ok', 'first_call_s': out['first_call_s'], **(extra or {})}
    candidates[label] = peer_candidate(peer, task_id)
  except peers_setup.PeerError as e:
    rows[label] = {'status': f'error: {e}'}


def time_candidates(rows, candidates, repeats: int, batch: int) -> None:
  """Times the candidates (interleaved) into their rows: seconds, median_s, images_per_s."""
  for k, ts in interleaved(candidates, repeats).items():
    row = rows.setdefault(k, {'status': 'ok'})
    row.update(seconds=ts, median_s=median(ts), images_per_s=batch / median(ts))


def _key(i):
  return jax.random.key(i)


# ------------------------------------------------------------------------------------------
# Models and data (shared with the foolbox worker: same seeds give the same weights).


def make_model(name: str, resnet_depth: int = 20):
  if name == 'resnet20':
    return models.create_model('resnet20', num_classes=10, depth=resnet_depth)
  if name == 'lenet_like':
    return models.create_model('lenet_like', num_classes=10, mean=MNIST_MEAN, std=MNIST_STD)
  raise ValueError(name)


def make_variables(model, shape, seed=0):
  """Initialised variables with non-trivial BatchNorm statistics (for the equivalence check)."""
  x = jnp.zeros((1, *shape), jnp.float32)
  variables = jax.jit(lambda k: model.init({'params': k}, x, train=False))(_key(seed))
  variables = dict(variables)
  if 'batch_stats' in variables:
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables['batch_stats'])
    new = []
    for i, (path, leaf) in enumerate(leaves):
      k = jax.random.fold_in(_key(seed + 1), i)
      if str(path[-1].key) == 'mean':
        new.append(0.1 * jax.random.normal(k, leaf.shape, leaf.dtype))
      else:
        new.append(jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 1.5))
    variables['batch_stats'] = jax.tree_util.tree_unflatten(tree, new)
  return variables


def make_batch(shape, batch, seed=1):
  kx, ky = jax.random.split(_key(seed))
  return (jax.random.uniform(kx, (batch, *shape), jnp.float32),
          jax.random.randint(ky, (batch,), 0, 10, jnp.int32))


def pgd_fn(model, hook=None, **static):
  """jit((variables, key, x, y, eps, step_size) -> x_adv): parameters are arguments."""

  def run(variables, key, x, y, eps, step_size):
    logits_fn = retrofit.make_logits_fn(model, variables, hook)
    return attacks.pgd(logits_fn, key, x, y, eps=eps, step_size=step_size, **static)

  return jax.jit(run)


def random_start(key, x, eps):
  """PGD's uniform random start in the eps ball, clipped to the [0, 1] box."""
  return jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)


def pgd_step_fn(model):
  """jit((variables, x_adv, x, y, eps, step_size) -> x_adv'): one L-inf PGD step, alone.

  The same gradient pass as advdef.attacks.pgd's loop body (summed cross-entropy w.r.t. the
  input, eval mode), a sign step and a clip projection. Used for the FLOP count of an attack
  step and for the diagnostic row "the step jitted alone, looped in Python".
  """

  def one_step(variables, x_adv, x, y, eps, step_size):
    logits_fn = retrofit.make_logits_fn(model, variables)
    g = jax.grad(lambda z: jnp.sum(attacks.cross_entropy(logits_fn(z, _key(0)), y)))(x_adv)
    return jnp.clip(jnp.clip(x_adv + step_size * jnp.sign(g), x - eps, x + eps), 0.0, 1.0)

  return jax.jit(one_step)


def model_label(name: str, depth: int) -> str:
  if name == 'resnet20':
    return 'ResNet-20' if depth == 20 else f'ResNet-{depth}'
  return 'lenet_like'


# ------------------------------------------------------------------------------------------
# 0. Equivalence of the PyTorch mirrors.


def check_equivalence(ctx, name) -> dict[str, Any]:
  peers, cfg = ctx['peers'], ctx['cfg']
  if not peers.usable('torch'):
    return {'status': peers.why_not('torch')}
  model = make_model(name, cfg['resnet_depth'])
  shape = SHAPES[name]
  variables = make_variables(model, shape)
  x, _ = make_batch(shape, 4, seed=7)
  logits = jax.jit(lambda v, z: model.apply(v, z, train=False))(variables, x)
  arrays = {}
  for coll, tree in variables.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      arrays[coll + '/' + '/'.join(str(p.key) for p in path)] = np.asarray(leaf)
  d = Path(ctx['tmp'])
  np.savez(d / f'{name}_weights.npz', **arrays)
  np.savez(d / f'{name}_inputs.npz', x=np.asarray(x), logits=np.asarray(logits))
  out = peers.torch.ask(op='check', model=name, shape=shape, depth=cfg['resnet_depth'],
                        mean=MNIST_MEAN, std=MNIST_STD, weights=str(d / f'{name}_weights.npz'),
                        inputs=str(d / f'{name}_inputs.npz'))
  advdef_params = models.count_params(variables)
  return {'status': 'ok', 'max_abs_logit_diff': out['max_abs_diff'],
          'max_abs_logit': out['max_abs_logit'], 'torch_params': out['params'],
          'advdef_params': advdef_params,
          'same': bool(out['max_abs_diff'] <= 1e-3 * max(1.0, out['max_abs_logit']) and
                       out['params'] == advdef_params)}


# ------------------------------------------------------------------------------------------
# 1. PGD throughput.


def bench_pgd(ctx, name) -> dict[str, Any]:
  cfg, peers, repeats = ctx['cfg'], ctx['peers'], ctx['repeats']
  model = make_model(name, cfg['resnet_depth'])
  shape, b, steps = SHAPES[name], cfg['pgd_batch'][name], cfg['pgd_steps']
  eps = EPS[name]
  step_size = 2.5 * eps / steps
  variables = make_variables(model, shape)
  x, y = make_batch(shape, b)
  fn = pgd_fn(model, steps=steps)
  args = (variables, _key(3), x, y, jnp.float32(eps), jnp.float32(step_size))
  compiled, compile_s = compile_jit(fn, *args)
  candidates = {'advdef': timer(compiled, *args)}
  first_run = candidates['advdef']()
  # Diagnostic (not a peer, not a target): the same step jitted alone and looped in Python,
  # which separates the cost of the step from that of running it inside lax.fori_loop.
  eps32, a32 = jnp.float32(eps), jnp.float32(step_size)
  step_c, _ = compile_jit(pgd_step_fn(model), variables, x, x, y, eps32, a32)
  start = jax.jit(random_start)

  def python_loop():
    x_adv = start(_key(4), x, eps32)
    for _ in range(steps):
      x_adv = step_c(variables, x_adv, x, y, eps32, a32)
    return x_adv

  candidates.update(warmed({'diag_step_python_loop': timer(python_loop)}))
  ctx['attack_step_flops'][name] = flops_of(step_c)
  rows: dict[str, Any] = {}
  spec = dict(model=name, shape=shape, batch=b, steps=steps, eps=eps, step_size=step_size,
              depth=cfg['resnet_depth'], mean=MNIST_MEAN, std=MNIST_STD)
  for peer_name, label, task in (('torch', 'torch_plain', 'pgd_plain'),
                                 ('torchattacks', 'torchattacks', 'pgd_torchattacks')):
    add_peer(peers, rows, candidates, peer_name, label, f'{task}/{name}', task=task, **spec)
  add_peer(peers, rows, candidates, 'foolbox', 'foolbox_jax', f'pgd/{name}',
           extra={'version': peers.status['foolbox'].get('foolbox')}, **spec)
  time_candidates(rows, candidates, repeats, b)
  adv = rows['advdef']
  adv.update(compile_s=compile_s, first_call_s=compile_s + first_run,
             compile_first_minus_steady_s=compile_s + first_run - adv['median_s'])
  ratios = {f'vs_{k}': ratio(adv['images_per_s'], r.get('images_per_s'))
            for k, r in rows.items() if k not in ('advdef', 'diag_step_python_loop')}
  rows['diag_step_python_loop']['note'] = (
      'diagnostic: the same PGD step jitted alone and called steps times from Python; '
      'not a peer, not used for targets')
  ratios['diag_fori_loop_slowdown'] = ratio(rows['diag_step_python_loop']['images_per_s'],
                                            adv['images_per_s'])
  best_torch = max([rows[k]['images_per_s'] for k in ('torch_plain', 'torchattacks')
                    if 'images_per_s' in rows.get(k, {})], default=None)
  ratios['vs_fastest_pytorch'] = ratio(adv['images_per_s'], best_torch)
  ctx['pgd_compiled'][name] = dict(median_s=adv['median_s'],
                                   diag_median_s=rows['diag_step_python_loop']['median_s'])
  return {'model': model_label(name, cfg['resnet_depth']), 'shape': shape, 'batch': b,
          'steps': steps, 'eps': eps, 'step_size': step_size, 'rows': rows, 'ratios': ratios}


# ------------------------------------------------------------------------------------------
# 2. Training throughput.


def _train_config():
  return ml_collections.ConfigDict(dict(
      learning_rate=0.1, num_epochs=1, schedule='constant', warmup_epochs=0, optimizer='sgd',
      momentum=0.9, nesterov=False, weight_decay=5e-4, decay_factor=0.1, boundaries=()))


def bench_train(ctx, name) -> dict[str, Any]:
  cfg, peers, repeats = ctx['cfg'], ctx['peers'], ctx['repeats']
  model = make_model(name, cfg['resnet_depth'])
  shape, b = SHAPES[name], cfg['train_batch'][name]
  n = 4 * b
  spe = n // b
  tx = training.create_optimizer(_train_config(), spe)
  state = jax.jit(lambda k: training.create_train_state(k, model, tx, shape))(_key(0))
  step_fn = training.make_train_step(
      model, tx, training.StepConfig(batch_size=b, steps_per_epoch=spe))
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (n, *shape), dtype=np.uint8))
  labels = jax.device_put(rng.integers(0, 10, (n,)).astype(np.int32))
  perm = jax.device_put(rng.permutation(n).astype(np.int32))
  train_key = _key(5)
  compiled, compile_s = compile_jit(step_fn, state, images, labels, perm, train_key)
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], images, labels, perm, train_key)
    return holder['state'], metrics

  candidates = {'advdef': timer(step)}
  first_run = candidates['advdef']()
  rows: dict[str, Any] = {}
  add_peer(peers, rows, candidates, 'torch', 'torch', f'train/{name}', task='train', model=name,
           shape=shape, batch=b, dataset_size=n, depth=cfg['resnet_depth'], mean=MNIST_MEAN,
           std=MNIST_STD, lr=0.1, momentum=0.9, weight_decay=5e-4)
  time_candidates(rows, candidates, repeats, b)
  adv = rows['advdef']
  adv.update(compile_s=compile_s, first_call_s=compile_s + first_run,
             compile_first_minus_steady_s=compile_s + first_run - adv['median_s'],
             flops=flops_of(compiled))
  return {'model': model_label(name, cfg['resnet_depth']), 'shape': shape, 'batch': b,
          'optimizer': 'sgd(lr=0.1, momentum=0.9, weight_decay=5e-4)', 'rows': rows,
          'ratios': {'vs_torch': ratio(adv['images_per_s'],
                                       rows.get('torch', {}).get('images_per_s'))}}


# ------------------------------------------------------------------------------------------
# 3. SAP cost.


def naive_host_sap(x_dev, rng: np.random.Generator, frac: float = 1.0):
  """SAP as a host operator: per example, numpy's categorical sampler with replacement."""
  a = np.asarray(x_dev)                                   # device -> host
  flat = a.reshape(a.shape[0], -1)
  out = np.zeros_like(flat)
  n = flat.shape[1]
  r = int(math.floor(frac * n))
  for i in range(flat.shape[0]):
    mag = np.abs(flat[i]).astype(np.float64)
    p = mag / mag.sum()
    drawn = rng.choice(n, size=r, replace=True, p=p)
    keep = np.zeros(n, bool)
    keep[drawn] = True
    q = -np.expm1(r * np.log1p(-np.minimum(p, 1 - 2.0**-53)))
    out[i] = np.where(keep, flat[i] / np.where(keep, q, 1.0), 0.0)
  return jax.device_put(out.reshape(a.shape))             # host -> device


def bench_sap(ctx) -> dict[str, Any]:
  cfg, repeats = ctx['cfg'], ctx['repeats']
  name = 'resnet20'
  model = make_model(name, cfg['resnet_depth'])
  shape, b = SHAPES[name], cfg['sap_batch']
  variables = make_variables(model, shape)
  x, y = make_batch(shape, b)

  def grad_fn(hook):
    def g(variables, key, x, y):
      logits_fn = retrofit.make_logits_fn(model, variables, hook)
      return jax.grad(lambda z: jnp.sum(attacks.cross_entropy(logits_fn(z, key), y)))(x)
    return jax.jit(g)

  args = (variables, _key(11), x, y)
  plain, plain_compile = compile_jit(grad_fn(None), *args)
  sap, sap_compile = compile_jit(grad_fn(retrofit.build_hook('sap(frac=1.0)')), *args)
  times = interleaved(warmed({'undefended': timer(plain, *args), 'sap100': timer(sap, *args)}),
                      repeats)
  model_part = {
      'model': model_label(name, cfg['resnet_depth']), 'batch': b,
      'pass': 'grad of summed cross-entropy w.r.t. the input (eval mode)',
      'sap_sites': sum(1 for _, k in models.list_sites(model, shape) if k == 'act'),
      'undefended_median_s': median(times['undefended']),
      'sap100_median_s': median(times['sap100']),
      'seconds': times, 'compile_s': {'undefended': plain_compile, 'sap100': sap_compile},
      'overhead_ratio': ratio(median(times['sap100']), median(times['undefended'])),
  }
  # The SAP paper's anchor: one SAP-100 backward pass on 512 CIFAR-10-shaped examples (the
  # authors: about 20 s on 8 GPUs with their MXNet operator; ../shared/reference/papers.md).
  ab = cfg['sap_anchor_batch']
  xa, ya = make_batch(shape, ab, seed=3)
  anchor_args = (variables, _key(14), xa, ya)
  anchor_fn, anchor_compile = compile_jit(grad_fn(retrofit.build_hook('sap(frac=1.0)')),
                                          *anchor_args)
  anchor_times = interleaved(warmed({'sap100': timer(anchor_fn, *anchor_args)}),
                             max(1, min(repeats, 2)))
  model_part['anchor'] = {'batch': ab, 'median_s': median(anchor_times['sap100']),
                          'seconds': anchor_times['sap100'], 'compile_s': anchor_compile,
                          'authors_s': 20.0, 'authors_hardware': '8 GPUs (MXNet operator)'}
  # One layer: the first stage's post-ReLU map, 32x32x16 per example.
  lb = cfg['sap_layer_batch']
  layer = jax.nn.relu(jax.random.normal(_key(12), (lb, 32, 32, 16), jnp.float32))
  exact = jax.jit(lambda key, h: defenses.sap(key, h, frac=1.0))
  exact_c, _ = compile_jit(exact, _key(13), layer)
  lt = interleaved(warmed({'advdef_exact': timer(exact_c, _key(13), layer),
                           'naive_host': timer(naive_host_sap, layer, np.random.default_rng(0))}),
                   max(repeats, 1))
  layer_part = {
      'shape': list(layer.shape), 'units_per_example': 32 * 32 * 16, 'draws_per_example':
      32 * 32 * 16, 'pass': 'forward (sampling + rescaling), result on the device',
      'advdef_exact_median_s': median(lt['advdef_exact']),
      'naive_host_median_s': median(lt['naive_host']), 'seconds': lt,
      'speedup': ratio(median(lt['naive_host']), median(lt['advdef_exact'])),
  }
  return {'model_pass': model_part, 'one_layer': layer_part}


# ------------------------------------------------------------------------------------------
# 4. EOT: vectorised vs sequential loop.


RSE_SPEC = 'rse(sigma_init=0.2, sigma_inner=0.1)'


def bench_eot(ctx) -> dict[str, Any]:
  cfg, peers, repeats = ctx['cfg'], ctx['peers'], ctx['repeats']
  name = 'resnet20'
  model = make_model(name, cfg['resnet_depth'])
  shape, b, k, steps = SHAPES[name], cfg['eot_batch'], cfg['eot_k'], cfg['eot_steps']
  eps = EPS[name]
  step_size = 2.5 * eps / steps
  variables = make_variables(model, shape)
  x, y = make_batch(shape, b)
  hook = retrofit.build_hook(RSE_SPEC)
  vec_fn = pgd_fn(model, hook, steps=steps, eot_samples=k)
  args = (variables, _key(21), x, y, jnp.float32(eps), jnp.float32(step_size))
  vec, vec_compile = compile_jit(vec_fn, *args)

  # The sequential reference: k jitted gradient passes per step, accumulated, then a jitted
  # sign step and projection (what AutoAttack / torchattacks / foolbox do, here compiled).
  def grad_acc(variables, x_adv, y, key, acc):
    logits_fn = retrofit.make_logits_fn(model, variables, hook)
    g = jax.grad(lambda z: jnp.sum(attacks.cross_entropy(logits_fn(z, key), y)))(x_adv)
    return acc + g

  def update(x_adv, x, acc, eps, step_size):
    x_adv = x_adv + step_size * jnp.sign(acc)
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)

  zeros = jnp.zeros_like(x)
  ga, ga_compile = compile_jit(jax.jit(grad_acc), variables, x, y, _key(0), zeros)
  up, _ = compile_jit(jax.jit(update), x, x, zeros, jnp.float32(eps), jnp.float32(step_size))
  st, _ = compile_jit(jax.jit(random_start), _key(0), x, jnp.float32(eps))
  keys = list(jax.random.split(_key(22), steps * k))
  eps32, a32 = jnp.float32(eps), jnp.float32(step_size)

  def loop():
    x_adv = st(_key(23), x, eps32)
    for i in range(steps):
      acc = zeros
      for j in range(k):
        acc = ga(variables, x_adv, y, keys[i * k + j], acc)
      x_adv = up(x_adv, x, acc, eps32, a32)
    return x_adv

  # Diagnostic: the vectorised EOT step (vmap over k keys) jitted alone and looped in Python,
  # i.e. vectorisation without lax.fori_loop (see the PGD section's diagnostic row).
  def vec_step(variables, x_adv, x, y, key, eps, step_size):
    logits_fn = retrofit.make_logits_fn(model, variables, hook)
    draws = jax.random.split(key, k)
    loss = lambda z: jnp.sum(jnp.mean(jax.vmap(
        lambda kk: attacks.cross_entropy(logits_fn(z, kk), y))(draws), axis=0))
    return update(x_adv, x, jax.grad(loss)(x_adv), eps, step_size)

  vs, _ = compile_jit(jax.jit(vec_step), variables, x, x, y, _key(0), eps32, a32)
  step_keys = list(jax.random.split(_key(24), steps))

  def vec_loop():
    x_adv = st(_key(23), x, eps32)
    for i in range(steps):
      x_adv = vs(variables, x_adv, x, y, step_keys[i], eps32, a32)
    return x_adv

  candidates = warmed({'advdef_vectorized': timer(vec, *args), 'sequential_loop': timer(loop),
                       'diag_vectorized_step_python_loop': timer(vec_loop)})
  rows: dict[str, Any] = {}
  add_peer(peers, rows, candidates, 'torchattacks', 'torchattacks_eotpgd', 'eot',
           task='eot_torchattacks', model=name, shape=shape, batch=b, steps=steps, eps=eps,
           step_size=step_size, eot=k, depth=cfg['resnet_depth'], rse=(0.2, 0.1))
  time_candidates(rows, candidates, repeats, b)
  rows['advdef_vectorized']['compile_s'] = vec_compile
  rows['sequential_loop']['compile_s'] = ga_compile
  adv = rows['advdef_vectorized']['median_s']
  return {'model': f'{model_label(name, cfg["resnet_depth"])} + {RSE_SPEC}', 'batch': b,
          'eot_samples': k, 'steps': steps, 'gradient_passes_per_attack': k * steps,
          'rows': rows,
          'ratios': {'speedup_vs_loop': ratio(rows['sequential_loop']['median_s'], adv),
                     'diag_vectorized_step_alone_vs_loop': ratio(
                         rows['sequential_loop']['median_s'],
                         rows['diag_vectorized_step_python_loop']['median_s']),
                     'speedup_vs_torchattacks': ratio(
                         rows.get('torchattacks_eotpgd', {}).get('median_s'), adv)}}


# ------------------------------------------------------------------------------------------
# 5. In-graph sweep.


def bench_sweep(ctx) -> dict[str, Any]:
  cfg = ctx['cfg']
  attack = f'pgd(steps={cfg["sweep_steps"]})'
  kappas = sweep_timing.DEFAULT_KAPPAS[:cfg['sweep_points']]
  res = sweep_timing.benchmark_kappa_sweep(
      values=kappas, attack=attack, epsilon=0.1, num_examples=cfg['sweep_examples'],
      batch_size=cfg['sweep_examples'])
  return {'source': 'scripts/sweep_timing.py benchmark_kappa_sweep (small_cnn, 8x8 digits)',
          'defense': 'jump(kappa)', 'kappas': list(kappas), 'attack': attack, 'epsilon': 0.1,
          'result': res,
          'ratios': {'speedup_incl_compile': res.get('ratio'),
                     'speedup_steady_state': ratio(res.get('separate_run_seconds'),
                                                   res.get('in_graph_run_seconds'))}}


# ------------------------------------------------------------------------------------------
# 7. FLOP/s against the measured matmul peak.


def bench_flops(ctx) -> dict[str, Any]:
  cfg, sections = ctx['cfg'], ctx['results']
  n = cfg['matmul_n']
  a = jax.random.normal(_key(41), (n, n), jnp.float32)
  bm = jax.random.normal(_key(42), (n, n), jnp.float32)
  mm, _ = compile_jit(jax.jit(jnp.matmul), a, bm)
  matmul = warmed({'matmul': timer(mm, a, bm)})['matmul']
  mm_times = [matmul() for _ in range(max(5, ctx['repeats'] + 2))]
  peak = 2 * n**3 / min(mm_times)
  out: dict[str, Any] = {'matmul': {'n': n, 'seconds': mm_times, 'peak_flops_per_s': peak,
                                    'median_flops_per_s': 2 * n**3 / median(mm_times),
                                    'flops_per_matmul': 2 * n**3}}
  for name in ('resnet20', 'lenet_like'):
    entry: dict[str, Any] = {}
    train = sections.get(f'train/{name}', {})
    adv = train.get('rows', {}).get('advdef', {})
    if adv.get('flops') and adv.get('median_s'):
      achieved = adv['flops'] / adv['median_s']
      entry['train_step'] = {'flops': adv['flops'], 'median_s': adv['median_s'],
                             'flops_per_s': achieved, 'fraction_of_peak': achieved / peak}
    p = ctx['pgd_compiled'].get(name)
    if p:
      fl = ctx['attack_step_flops'].get(name)
      per_step = p['median_s'] / cfg['pgd_steps']
      if fl:
        entry['attack_step'] = {
            'flops': fl, 'seconds_per_step_in_pgd': per_step, 'flops_per_s': fl / per_step,
            'fraction_of_peak': fl / per_step / peak,
            'note': 'FLOPs of one compiled PGD step (gradient + sign step + projection); time '
                    '= advdef.attacks.pgd median / steps (XLA counts a loop body once, so the '
                    'whole PGD cannot be costed directly)'}
        diag = p.get('diag_median_s')
        if diag:
          entry['attack_step_outside_loop'] = {
              'flops': fl, 'seconds_per_step': diag / cfg['pgd_steps'],
              'flops_per_s': fl * cfg['pgd_steps'] / diag,
              'fraction_of_peak': fl * cfg['pgd_steps'] / diag / peak,
              'note': 'diagnostic: the same step jitted alone, looped in Python'}
    out[name] = entry
  return out


# ------------------------------------------------------------------------------------------
# The foolbox worker (runs this file in a subprocess with foolbox on sys.path).


def foolbox_worker():
  site = os.environ.get('ADVDEF_BENCH_FOOLBOX_SITE')
  if site:
    sys.path.append(site)  # Appended: this environment's numpy/scipy/jax win.
  tasks = {}
  for line in sys.stdin:
    line = line.strip()
    if not line:
      continue
    try:
      cmd = json.loads(line)
      op = cmd['op']
      if op == 'quit':
        print(json.dumps({'ok': True}), flush=True)
        return
      if op == 'info':
        import eagerpy
        import foolbox
        out = {'foolbox': foolbox.__version__, 'eagerpy': eagerpy.__version__,
               'jax': jax.__version__, 'backend': jax.default_backend()}
      elif op == 'setup':
        import foolbox as fb
        name = cmd['model']
        model = make_model(name, cmd.get('depth', 20))
        shape = tuple(cmd['shape'])
        variables = make_variables(model, shape)
        x, y = make_batch(shape, cmd['batch'])
        # The forward pass jitted (foolbox's best case); foolbox differentiates it eagerly.
        forward = jax.jit(lambda v, z: model.apply(v, z, train=False))
        fmodel = fb.JAXModel(lambda z: forward(variables, z), bounds=(0.0, 1.0))
        attack = fb.attacks.LinfPGD(abs_stepsize=cmd['step_size'], steps=cmd['steps'],
                                    random_start=True)
        eps = cmd['eps']
        run = lambda: attack.run(fmodel, x, y, epsilon=eps)
        tasks[cmd['id']] = run
        out = {'first_call_s': timed(run)}
      elif op == 'time':
        out = {'seconds': [timed(tasks[cmd['id']]) for _ in range(int(cmd.get('n', 1)))]}
      else:
        raise ValueError(f'unknown op {op!r}')
      out['ok'] = True
    except Exception as e:
      out = {'ok': False, 'error': f'{type(e).__name__}: {e}',
             'traceback': traceback.format_exc(limit=4)}
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------
# Report.


# ------------------------------------------------------------------------------------------
# 8. The quick start end to end, with a cold and then a warm compilation cache.


def bench_quickstart(ctx) -> dict[str, Any]:
  """`python -m advdef.main` on the quick start, twice: first with an empty persistent
  compilation cache (what a new user waits), then again with the cache it filled."""
  config = ctx['cfg']['quickstart']
  root = Path(__file__).resolve().parent.parent
  cache = os.path.join(ctx['tmp'], 'quickstart_cache')
  out = {'config': config}
  for label in ('cold_cache', 'warm_cache'):
    workdir = os.path.join(ctx['tmp'], f'quickstart_{label}')
    t0 = time.time()
    proc = subprocess.run([sys.executable, '-m', 'advdef.main', f'--config={config}',
                           f'--workdir={workdir}', f'--compilation_cache={cache}'],
                          cwd=root, capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    if proc.returncode:
      raise RuntimeError(f'quick start ({label}) exited {proc.returncode}: '
                         f'{proc.stderr.strip().splitlines()[-1:]}')
    with open(os.path.join(workdir, 'report.json')) as f:
      timing = json.load(f)['timing']
    out[label] = dict(timing, process_seconds=seconds)
  return out


# ------------------------------------------------------------------------------------------
# 9. Loop overhead per attack family: one iteration inside the attack's loop vs alone.


# The stochastic model of the EOT family: Gaussian noise on the input (RSE's first layer). With
# RSE's inner noise layers too, the family took 42 s of the quick run instead of 20 (compile).
LOOPS_EOT_SPEC = 'noise(sigma=0.1)'


class LoopFamily(NamedTuple):
  """One attack family of the 'loops' section.

  attack(logits_fn, key, x, y, n, **hparams) -> x_adv runs the attack for n iterations of its
  loop (n static). hparams (float32 scalars) are jit arguments, so values picked to keep every
  example unfooled (1e-6) stay traced, as in real use. alone(logits_fn, key, x, y) -> array is
  the model work of one iteration (`step_alone` describes it). early_stop: the loop is a
  `lax.while_loop` that ends once every example is fooled, so the run is checked.
  """
  attack: Callable
  hparams: dict[str, float]
  alone: Callable
  step_alone: str
  hook: str | None = None
  early_stop: bool = False
  note: str = ''


def _grad_pass(loss_fn, draws: int = 1):
  """Step alone: the input gradient of the summed per-example loss (mean over `draws` draws of
  the model's randomness, vmapped as the attacks' EOT is), and a sign step in the box."""

  def alone(logits_fn, key, x, y):
    def total(z):
      if draws == 1:
        return jnp.sum(loss_fn(logits_fn(z, key), y))
      per_draw = jax.vmap(lambda k: loss_fn(logits_fn(z, k), y))(jax.random.split(key, draws))
      return jnp.sum(jnp.mean(per_draw, axis=0))
    return jnp.clip(x + 1e-6 * jnp.sign(jax.grad(total)(x)), 0.0, 1.0)

  return alone


def _jacobian_pass(m: int):
  """Step alone: a forward pass and m vector-Jacobian products, the gradients of z_k - z_y for
  m classes k != y (vmapped over the cotangents, as DeepFool does), each one's L2 norm, and a
  sign step along the closest linearised boundary (so no product is dead code)."""

  def alone(logits_fn, key, x, y):
    logits, vjp_fn = jax.vjp(lambda z: logits_fn(z, key), x)
    k = logits.shape[-1]
    others = (y[:, None] + 1 + jnp.arange(m)[None, :]) % k                 # [B, m]
    cotangents = jax.nn.one_hot(others, k) - jax.nn.one_hot(y, k)[:, None, :]
    w = jax.vmap(lambda c: vjp_fn(c)[0], in_axes=1, out_axes=1)(cotangents)  # [B, m, ...]
    norms = jnp.sqrt(jnp.sum(jnp.square(w.reshape(*w.shape[:2], -1)), axis=-1))
    gap = jnp.take_along_axis(logits, y[:, None], -1) - jnp.take_along_axis(logits, others, -1)
    best = jnp.argmin(jnp.abs(gap) / (norms + 1e-8), axis=1)
    w_best = jnp.take_along_axis(w, best.reshape((-1, 1) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    return jnp.clip(x + 1e-6 * jnp.sign(w_best), 0.0, 1.0)

  return alone


def _forward_pass(logits_fn, key, x, y):
  """Step alone of a score-based attack: one forward pass and the margin of its logits."""
  return attacks.margin(logits_fn(x, key), y)


def _pgd_at_crafting(logits_fn, key, x, y, n, **hparams):
  """PGD-AT's crafting loop as its train step runs it: `advdef.recipes._pgd` (the only call the
  pgd_at recipe makes to craft), which unrolls the loop when the train step asks; the train
  step asks on CPU (`training.make_train_step`'s `unroll_attacks` default)."""
  step_context = recipes.StepContext(  # _pgd reads only `unroll`.
      forward=None, eval_logits_fn=None, cross_entropy=None, num_train=0,
      unroll=jax.default_backend() == 'cpu')
  h = {**recipes.parse_recipe(f'pgd_at(eps=1, steps={n}, random_start=False)').hparams,
       **hparams}
  return recipes._pgd(step_context, h, logits_fn, key, x, y)  # pylint: disable=protected-access


def loop_families(eps: float, eot_k: int) -> dict[str, LoopFamily]:
  """The attack families of the 'loops' section (eps: the model's L-inf budget in pixels).

  PGD, EOT-PGD, APGD and PGD-AT start from x (random_start=False): the random start is set-up,
  which the two-step-count difference cancels anyway, and its sampler costs ~2 s of compile per
  program on 2 CPU cores.
  """
  grad_ce = _grad_pass(attacks.cross_entropy)  # One object for four families: one compile.
  grad_ce_desc = 'gradient pass: grad of the summed CE w.r.t. the input, sign step'
  unfooled = 'checked: examples still classified as y after S2, so all iterations ran'
  return {
      'PGD': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.pgd(lf, k, x, y, steps=n, random_start=False,
                                                  **h),
          {'eps': eps, 'step_size': eps / 4}, grad_ce, grad_ce_desc,
          note='rolled lax.fori_loop'),
      'EOT-PGD': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.pgd(lf, k, x, y, steps=n, random_start=False,
                                                  eot_samples=eot_k, **h),
          {'eps': eps, 'step_size': eps / 4}, _grad_pass(attacks.cross_entropy, eot_k),
          f'{eot_k} gradient passes vmapped over draws (mean CE), sign step',
          hook=LOOPS_EOT_SPEC, note=f'{LOOPS_EOT_SPEC}, eot_samples={eot_k}'),
      'APGD-CE': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.apgd(lf, k, x, y, steps=n, loss='ce',
                                                   random_start=False, **h),
          {'eps': eps}, grad_ce, grad_ce_desc,
          note='the step-size bookkeeping is in the loop, not in the step alone'),
      'Square': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.square(lf, k, x, y, queries=n, **h),
          {'eps': 1e-6}, _forward_pass, 'forward pass and margin', early_stop=True,
          note=f'eps=1e-6; iterations = queries - 1; {unfooled}'),
      'C&W-L2': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.cw_l2(lf, k, x, y, steps=n, search_steps=1, **h),
          {}, _grad_pass(attacks.margin),
          'gradient pass: grad of the summed margin w.r.t. the input, sign step',
          note='search_steps=1, steps varied; the loop also runs tanh and Adam'),
      'DeepFool': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.deepfool(lf, k, x, y, steps=n, **h),
          {'overshoot': -1.0}, _jacobian_pass(9),  # 10 classes considered: 9 candidates.
          'forward pass + 9 vjps (vmapped), norms and a step', early_stop=True,
          note=('overshoot=-1 (traced: below its validated range >= 0) keeps x_adv = x: same '
                f'work per iteration, nothing fooled; {unfooled}')),
      'IFGSM-min': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.ifgsm_min(lf, k, x, y, steps=n, **h),
          {'step_size': 1e-6}, grad_ce, grad_ce_desc, early_stop=True,
          note=f'step_size=1e-6; {unfooled}'),
      'trust_region': LoopFamily(
          lambda lf, k, x, y, n, **h: attacks.trust_region(lf, k, x, y, steps=n, **h),
          {'radius': 1e-6, 'overshoot': 0.0}, _jacobian_pass(1),
          'forward pass + 1 vjp (z_t - z_y), its norm and a step', early_stop=True,
          note=f'radius=1e-6 (steps of ~1e-4 L2); {unfooled}'),
      'PGD-AT crafting': LoopFamily(
          _pgd_at_crafting, {'eps': eps, 'step_size': eps / 4}, grad_ce, grad_ce_desc,
          note=f'recipes._pgd, unroll={jax.default_backend() == "cpu"} (the train step\'s)'),
  }


def time_loop_family(family: LoopFamily, model, variables, x, y, steps, repeats, predict,
                     alone_cache: dict) -> dict[str, Any]:
  """One family's row: the attack jitted at steps S1 < S2 and its step alone, interleaved.

  in_loop_step_s = (T(S2) - T(S1)) / (S2 - S1) seconds, which cancels the attack's set-up;
  step_alone_s = seconds of one call of the step alone. T is the minimum over the rounds, not
  the median: load from other processes only adds time, and a difference of two medians of a
  few rounds carries the load noise of both (on a loaded 2-core machine, quick runs gave
  ratios from 0.5 to 1.6 with medians, 0.9 to 1.2 with minima). An early-stopping attack's S2
  run is checked with `predict` (variables, x) -> labels. alone_cache maps (alone, hook) to
  (compiled, compile seconds), so families sharing a step alone compile it once.
  """
  hook = retrofit.build_hook(family.hook) if family.hook else None
  hparams = {k: jnp.float32(v) for k, v in family.hparams.items()}
  args = (variables, _key(61), x, y)

  def attack_fn(n):
    return jax.jit(lambda v, key, x, y, h: family.attack(
        retrofit.make_logits_fn(model, v, hook), key, x, y, n, **h))

  if (family.alone, family.hook) not in alone_cache:
    alone_cache[family.alone, family.hook] = compile_jit(jax.jit(
        lambda v, key, x, y: family.alone(retrofit.make_logits_fn(model, v, hook), key, x, y)),
        *args)
  alone_c, alone_compile_s = alone_cache[family.alone, family.hook]
  s1, s2 = steps
  (run1, compile1), (run2, compile2) = (compile_jit(attack_fn(n), *args, hparams) for n in steps)
  times = interleaved(warmed({'s1': timer(run1, *args, hparams),
                              's2': timer(run2, *args, hparams),
                              'alone': timer(alone_c, *args)}), repeats)
  t1, t2, alone = (min(times[k]) for k in ('s1', 's2', 'alone'))
  in_loop = (t2 - t1) / (s2 - s1)
  out = {'in_loop_step_s': in_loop, 'step_alone_s': alone, 'ratio': ratio(in_loop, alone),
         'steps': [s1, s2], 'attack_min_s': [t1, t2], 'step_alone': family.step_alone,
         'seconds': times, 'note': family.note,
         'compile_s': {'s1': compile1, 's2': compile2, 'alone': alone_compile_s}}
  if in_loop <= 0:
    out['note'] = 'not measured: T(S2) <= T(S1), timing noise; raise --repeats'
  if family.early_stop:
    # An example classified as y at the end was never fooled, so the loop ran all S2 steps.
    still = float(jnp.mean(predict(variables, run2(*args, hparams)) == y))
    out['still_correct_after_s2'] = still
    if still == 0:
      out.update(ratio=None, note=f'not measured: every example fooled within {s2} '
                                   'iterations, the loop may have stopped early')
  return out


def bench_loops(ctx) -> dict[str, Any]:
  """Per attack family: the marginal seconds of one iteration of the attack's own compiled loop
  against the same model work jitted alone (see the module docstring, section 9)."""
  cfg, repeats = ctx['cfg'], ctx['repeats']
  name, b, steps = cfg['loops_model'], cfg['loops_batch'], cfg['loops_steps']
  model = make_model(name, cfg['resnet_depth'])
  variables = make_variables(model, SHAPES[name])
  x, _ = make_batch(SHAPES[name], b, seed=6)
  predict = jax.jit(lambda v, z: jnp.argmax(model.apply(v, z, train=False), axis=-1))
  # Labels = the clean predictions: every example starts correctly classified, so the
  # early-stopping attacks have work in every iteration.
  y = predict(variables, x)
  families, alone_cache = {}, {}
  chosen = cfg.get('loops_families')  # None: every family.
  for label, family in loop_families(EPS[name], cfg['eot_k']).items():
    if chosen and label not in chosen:
      continue
    t0 = time.time()
    try:
      families[label] = time_loop_family(family, model, variables, x, y, steps, repeats,
                                         predict, alone_cache)
    except Exception as e:  # One family's failure leaves the others' rows.
      families[label] = {'ratio': None, 'steps': list(steps),
                         'note': f'error: {type(e).__name__}: {e}',
                         'traceback': traceback.format_exc(limit=6)}
    families[label]['family_seconds'] = time.time() - t0
    log(f'loops: {label}: {_x(families[label]["ratio"])} ({time.time() - t0:.1f} s)')
  return {'model': model_label(name, cfg['resnet_depth']), 'batch': b, 'steps': list(steps),
          'families': families}


def evaluate_targets(results) -> list[dict[str, Any]]:
  def get(path):
    section, *rest = path
    node = results.get(section)
    for p in rest:
      node = node.get(p) if isinstance(node, dict) else None
    return node

  values = {
      'pgd/resnet20': get(['pgd/resnet20', 'ratios', 'vs_fastest_pytorch']),
      'pgd/lenet_like': get(['pgd/lenet_like', 'ratios', 'vs_fastest_pytorch']),
      'train/resnet20': get(['train/resnet20', 'ratios', 'vs_torch']),
      'train/lenet_like': get(['train/lenet_like', 'ratios', 'vs_torch']),
      'sap/overhead': get(['sap', 'model_pass', 'overhead_ratio']),
      'eot/speedup': get(['eot', 'ratios', 'speedup_vs_loop']),
      'sweep/speedup': get(['sweep', 'ratios', 'speedup_incl_compile']),
      'flops/train_fraction': get(['flops', 'resnet20', 'train_step', 'fraction_of_peak']),
      'quickstart/cold': get(['quickstart', 'cold_cache', 'process_seconds']),
      'loops/worst': max((f['ratio'] for f in (get(['loops', 'families']) or {}).values()
                          if f.get('ratio') is not None), default=None),
  }
  label = (results.get('pgd/resnet20') or {}).get('model') or 'ResNet-20'
  out = []
  for key, desc, op, thr in TARGETS:
    desc = desc.replace('ResNet-20', label)
    v = values.get(key)
    if v is None:
      status, margin = 'N/A', None
    else:
      ok = v >= thr if op == '>=' else v <= thr
      status = 'PASS' if ok else 'MISS'
      margin = v / thr
    out.append({'key': key, 'target': f'{desc} {op} {thr:g}', 'op': op, 'threshold': thr,
                'value': v, 'status': status, 'value_over_threshold': margin})
  return out


def _fmt(v, unit=''):
  if v is None:
    return '-'
  if isinstance(v, str):
    return v
  if abs(v) >= 1000:
    return f'{v:,.0f}{unit}'
  if abs(v) >= 100:
    return f'{v:.0f}{unit}'
  if abs(v) >= 10:
    return f'{v:.1f}{unit}'
  if abs(v) >= 1:
    return f'{v:.2f}{unit}'
  return f'{v:.3g}{unit}'


def _x(v):
  return '-' if v is None else f'{v:.2f}x'


def table_rows(results) -> list[tuple[str, str, str, str, str]]:
  rows = []
  for name in ('resnet20', 'lenet_like'):
    s = results.get(f'pgd/{name}')
    if not s:
      continue
    if 'error' in s:
      rows.append(('1 pgd', name, 'ERROR', s['error'][:60], '-'))
      continue
    what = f'{s["model"]} {"x".join(map(str, s["shape"]))} PGD-{s["steps"]} b={s["batch"]} img/s'
    adv = s['rows']['advdef']['images_per_s']
    first = True
    for k, label in (('torch_plain', 'PyTorch loop'), ('torchattacks', 'torchattacks.PGD'),
                     ('foolbox_jax', 'foolbox JAX')):
      r = s['rows'].get(k, {})
      ref = (f'{label} {_fmt(r["images_per_s"])}' if 'images_per_s' in r
             else f'{label}: {r.get("status", "n/a")}'[:60])
      rows.append(('1 pgd' if first else '', what if first else '',
                   _fmt(adv) if first else '', ref, _x(s['ratios'].get(f'vs_{k}'))))
      first = False
    d = s['rows'].get('diag_step_python_loop', {})
    if 'images_per_s' in d:
      rows.append(('', '', '',
                   f'(diag) same step jitted alone, Python loop {_fmt(d["images_per_s"])}',
                   _x(s['ratios'].get('diag_fori_loop_slowdown') and
                      1 / s['ratios']['diag_fori_loop_slowdown'])))
  for name in ('resnet20', 'lenet_like'):
    s = results.get(f'train/{name}')
    if not s:
      continue
    if 'error' in s:
      rows.append(('2 train', name, 'ERROR', s['error'][:60], '-'))
      continue
    r = s['rows'].get('torch', {})
    ref = (f'PyTorch {_fmt(r["images_per_s"])}' if 'images_per_s' in r
           else f'PyTorch: {r.get("status")}'[:60])
    rows.append(('2 train', f'{s["model"]} SGD+momentum+BN step b={s["batch"]} img/s',
                 _fmt(s['rows']['advdef']['images_per_s']), ref, _x(s['ratios']['vs_torch'])))
  s = results.get('sap')
  if s and 'error' not in s:
    m, l = s['model_pass'], s['one_layer']
    rows.append(('3 sap', f'{m["model"]} + SAP-100 x{m["sap_sites"]} fwd+bwd b={m["batch"]} ms',
                 _fmt(1e3 * m['sap100_median_s']),
                 f'undefended {_fmt(1e3 * m["undefended_median_s"])} ms',
                 f'{m["overhead_ratio"]:.2f}x cost'))
    a = m.get('anchor')
    if a:
      rows.append(('', f'SAP paper anchor: SAP-100 backward, {a["batch"]} CIFAR images, s',
                   _fmt(a['median_s']), f'authors: {a["authors_s"]:g} s on '
                   f'{a["authors_hardware"]}', '-'))
    rows.append(('', f'one layer {"x".join(map(str, l["shape"]))} exact SAP fwd ms',
                 _fmt(1e3 * l['advdef_exact_median_s']),
                 f'numpy rng.choice/example {_fmt(1e3 * l["naive_host_median_s"])} ms',
                 _x(l['speedup'])))
  elif s:
    rows.append(('3 sap', 'ERROR', '-', s['error'][:60], '-'))
  s = results.get('eot')
  if s and 'error' not in s:
    r = s['rows']
    rows.append(('4 eot', f'EOT-{s["eot_samples"]} PGD-{s["steps"]} RSE b={s["batch"]} s',
                 _fmt(r['advdef_vectorized']['median_s']),
                 f'sequential loop {_fmt(r["sequential_loop"]["median_s"])} s',
                 _x(s['ratios']['speedup_vs_loop'])))
    t = r.get('torchattacks_eotpgd', {})
    rows.append(('', '', '', f'torchattacks.EOTPGD {_fmt(t["median_s"])} s' if 'median_s' in t
                 else f'torchattacks.EOTPGD: {t.get("status")}'[:60],
                 _x(s['ratios']['speedup_vs_torchattacks'])))
    d = r['diag_vectorized_step_python_loop']
    rows.append(('', '(diag) vectorised step jitted alone, Python loop s', _fmt(d['median_s']),
                 f'sequential loop {_fmt(r["sequential_loop"]["median_s"])} s',
                 _x(s['ratios']['diag_vectorized_step_alone_vs_loop'])))
  elif s:
    rows.append(('4 eot', 'ERROR', '-', s['error'][:60], '-'))
  s = results.get('sweep')
  if s and 'error' not in s:
    r = s['result']
    rows.append(('5 sweep', f'jump kappa x{len(s["kappas"])} {s["attack"]} incl. compile s',
                 _fmt(r['in_graph_seconds']),
                 f'{len(s["kappas"])} separate jits {_fmt(r["separate_seconds"])} s',
                 _x(s['ratios']['speedup_incl_compile'])))
    rows.append(('', 'same, steady state (compiled) s', _fmt(r.get('in_graph_run_seconds')),
                 f'{len(s["kappas"])} separate calls {_fmt(r.get("separate_run_seconds"))} s',
                 _x(s['ratios']['speedup_steady_state'])))
  elif s:
    rows.append(('5 sweep', 'ERROR', '-', s['error'][:60], '-'))
  first = True
  for name in ('resnet20', 'lenet_like'):
    for sec, label in ((f'train/{name}', 'train step'), (f'pgd/{name}', 'PGD')):
      s = results.get(sec)
      if not s or 'error' in s:
        continue
      a = s['rows']['advdef']
      rows.append(('6 compile' if first else '', f'{s["model"]} {label}: lower+compile s',
                   _fmt(a['compile_s']),
                   f'first call - steady {_fmt(a["compile_first_minus_steady_s"])} s', ''))
      first = False
  s = results.get('flops')
  if s and 'error' not in s:
    mm = s['matmul']
    rows.append(('7 flops', f'float32 matmul {mm["n"]}^2 peak GFLOP/s',
                 _fmt(mm['peak_flops_per_s'] / 1e9),
                 f'median {_fmt(mm["median_flops_per_s"] / 1e9)}',
                 ''))
    for name in ('resnet20', 'lenet_like'):
      for part, label in (('train_step', 'train step'), ('attack_step', 'PGD step'),
                          ('attack_step_outside_loop', '(diag) step alone')):
        e = s.get(name, {}).get(part)
        if e:
          rows.append(('', f'{name} {label} GFLOP/s', _fmt(e['flops_per_s'] / 1e9),
                       f'{_fmt(e["flops"] / 1e9)} GFLOP/step',
                       f'{100 * e["fraction_of_peak"]:.1f}% peak'))
  elif s:
    rows.append(('7 flops', 'ERROR', '-', s['error'][:60], '-'))
  s = results.get('quickstart')
  if s and 'error' not in s:
    for label, what in (('cold_cache', 'empty compilation cache'),
                        ('warm_cache', 'rerun, cache filled')):
      t = s[label]
      compiling = t['compile_seconds'] + t['trace_seconds']
      rows.append(('8 quickstart' if label == 'cold_cache' else '',
                   f'quick start end to end, {what}, s', _fmt(t['process_seconds']),
                   f'compiling {_fmt(compiling)} s ({compiling / t["wall_seconds"]:.0%}), '
                   f'{t["compilations"]} programs, {t["cache_hits"]} from cache', '-'))
  elif s:
    rows.append(('8 quickstart', 'ERROR', '-', s['error'][:60], '-'))
  s = results.get('loops')
  if s and 'error' not in s:
    first = True
    for label, f in s['families'].items():
      what = f'(diag) {label} step in loop / alone, {s["model"]} b={s["batch"]} ms'
      if f['ratio'] is None:
        measured = ('-', f['note'][:60], '-')
      else:
        measured = (_fmt(1e3 * f['in_loop_step_s']),
                    f'step alone {_fmt(1e3 * f["step_alone_s"])} ms', f'{f["ratio"]:.2f}x cost')
      rows.append(('9 loops' if first else '', what, *measured))
      first = False
  elif s:
    rows.append(('9 loops', 'ERROR', '-', s['error'][:60], '-'))
  return rows


def render(report) -> str:
  m = report['machine']
  lines = []
  torch_st = report['peers'].get('torch', {})
  torch_desc = (f'torch {torch_st.get("torch")} ({torch_st.get("threads")} threads)'
                if torch_st.get('status') == 'ok' else f'torch {torch_st.get("status")}')
  lines.append(f'advdef benchmark ({report["mode"]}): {m["cpu_model"]}, {m["cores_available"]} '
               f'cores, {m["backend"]} ({m["device_kind"]}); jax {m["jax"]}, {torch_desc}; '
               f'load average {m["load_average_start"][0]:.1f} -> '
               f'{m.get("load_average_end", [float("nan")])[0]:.1f}')
  for k, eq in report.get('equivalence', {}).items():
    if eq.get('status') == 'ok':
      lines.append(f'  PyTorch mirror of {k}: {eq["torch_params"]} params (advdef '
                   f'{eq["advdef_params"]}), max |logit diff| {eq["max_abs_logit_diff"]:.1e} '
                   f'-> {"same network" if eq["same"] else "MISMATCH"}')
    else:
      lines.append(f'  PyTorch mirror of {k}: {eq.get("status")}')
  header = ('section', 'measurement', 'advdef', 'reference', 'ratio')
  rows = [header] + table_rows(report['results'])
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  widths[3] = min(widths[3], 62)
  for i, r in enumerate(rows):
    lines.append('  '.join(c[:widths[j]].ljust(widths[j]) if j != 2 else c.rjust(widths[j])
                           for j, c in enumerate(r)).rstrip())
    if i == 0:
      lines.append('  '.join('-' * w for w in widths))
  lines.append('ratio: advdef speed over the reference (>1 = advdef faster); SAP: cost over the '
               'undefended pass, loops: in-loop step over the step alone (lower is better).')
  lines.append('Targets:')
  for t in report['targets']:
    v = '-' if t['value'] is None else f'{t["value"]:.3g}'
    lines.append(f'  {t["status"]:4s}  {t["target"]:70s} got {v}')
  lines.append(f'elapsed {report["elapsed_s"]:.0f} s; JSON: {report.get("out")}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------
# Main.


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--quick', action='store_true', help='small sizes, same comparisons')
  mode.add_argument('--tiny', action='store_true', help='smoke-test sizes (tests)')
  parser.add_argument('--skip-peers', action='store_true', help='no PyTorch / foolbox rows')
  peers_setup.add_arguments(parser)  # --no-foolbox, --bench-home, --torch-omp-wait-policy.
  parser.add_argument('--out', default=None,
                      help='JSON path (default /tmp/advdef_bench_<mode>.json)')
  parser.add_argument('--repeats', type=int, default=None, help='override the mode\'s repeats')
  parser.add_argument('--only', default=None,
                      help='comma-separated sections to run '
                      '(pgd,train,sap,eot,sweep,flops,quickstart,loops)')
  parser.add_argument('--foolbox-worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.foolbox_worker:
    foolbox_worker()
    return 0
  t_start = time.time()
  mode_name = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
  cfg = MODES[mode_name]
  repeats = args.repeats or cfg['repeats']
  out_path = args.out or f'/tmp/advdef_bench_{mode_name}.json'
  on_gpu = jax.default_backend() == 'gpu'
  if on_gpu:
    jax.config.update('jax_default_matmul_precision', 'highest')  # float32, no TF32.
  machine = describe_machine()
  log(f'mode {mode_name}; {machine["cpu_model"]}, {machine["cores_available"]} cores, '
      f'{machine["backend"]}; load {machine["load_average_start"]}')
  t0 = time.time()
  peers = peers_setup.Peers(args, on_gpu)
  peer_setup_s = time.time() - t0
  log(f'peers: { {k: v.get("status") for k, v in peers.status.items()} } ({peer_setup_s:.0f} s)')
  only = set(args.only.split(',')) if args.only else None
  results: dict[str, Any] = {}
  ctx = {'cfg': cfg, 'peers': peers, 'repeats': repeats, 'pgd_compiled': {},
         'attack_step_flops': {}, 'results': results}
  report: dict[str, Any] = {'mode': mode_name, 'config': dict(cfg, repeats=repeats),
                            'machine': machine, 'peers': peers.status,
                            'peer_setup_seconds': peer_setup_s}
  with tempfile.TemporaryDirectory() as tmp:
    ctx['tmp'] = tmp
    equivalence = {}
    for name in ('resnet20', 'lenet_like'):
      try:
        equivalence[name] = check_equivalence(ctx, name)
      except Exception as e:
        equivalence[name] = {'status': f'error: {type(e).__name__}: {e}'}
    report['equivalence'] = equivalence
    plan = [('pgd', 'pgd/resnet20', lambda: bench_pgd(ctx, 'resnet20')),
            ('pgd', 'pgd/lenet_like', lambda: bench_pgd(ctx, 'lenet_like')),
            ('train', 'train/resnet20', lambda: bench_train(ctx, 'resnet20')),
            ('train', 'train/lenet_like', lambda: bench_train(ctx, 'lenet_like')),
            ('sap', 'sap', lambda: bench_sap(ctx)),
            ('eot', 'eot', lambda: bench_eot(ctx)),
            ('sweep', 'sweep', lambda: bench_sweep(ctx)),
            ('flops', 'flops', lambda: bench_flops(ctx)),
            ('loops', 'loops', lambda: bench_loops(ctx))]
    if cfg['quickstart']:
      plan.append(('quickstart', 'quickstart', lambda: bench_quickstart(ctx)))
    try:
      for group, key, fn in plan:
        if only and group not in only:
          continue
        t1 = time.time()
        log(f'{key} ...')
        try:
          results[key] = fn()
        except Exception as e:
          results[key] = {'error': f'{type(e).__name__}: {e}',
                          'traceback': traceback.format_exc(limit=6)}
          log(f'{key} failed: {results[key]["error"]}')
        results[key]['section_seconds'] = time.time() - t1
        log(f'{key} done in {time.time() - t1:.0f} s')
    finally:
      peers.close()
  results['compile'] = {
      k: {'lower_compile_s': results[k]['rows']['advdef']['compile_s'],
          'first_call_minus_steady_s': results[k]['rows']['advdef']['compile_first_minus_steady_s']}
      for k in ('train/resnet20', 'train/lenet_like', 'pgd/resnet20', 'pgd/lenet_like')
      if k in results and 'rows' in results[k]}
  machine['load_average_end'] = list(os.getloadavg())
  report['results'] = results
  report['targets'] = evaluate_targets(results)
  report['elapsed_s'] = time.time() - t_start
  report['out'] = out_path
  Path(out_path).parent.mkdir(parents=True, exist_ok=True)
  Path(out_path).write_text(json.dumps(report, indent=1, default=str))
  print(render(report), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
