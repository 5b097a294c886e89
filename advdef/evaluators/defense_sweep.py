"""In-graph hyperparameter sweeps: a grid of one defense hyperparameter in ONE compiled call.

A sweep evaluates one defense at every value of a grid of one of its numeric hyperparameters
(JumpReLU's kappa, SAP's frac, RSE's sigma_init / sigma_inner, the noise baseline's sigma):
clean accuracy, and robust accuracy under one attack at one epsilon. The defense is built
inside a function of the traced value, the function is `jax.vmap`ped over the grid axis and
jitted once, so a 10-point grid costs one compilation instead of ten (see
`benchmark_kappa_sweep`). With several devices, and a grid whose length they divide, the grid
axis is sharded over a 1-D mesh named 'grid'.

Config (`eval.sweep`, see advdef.config_utils.base_config):

  eval.sweep = dict(defense='jump', param='kappa', values=(0.0, 0.2, ..., 1.8),
                    fixed='',                    # the other hyperparameters, 'surrogate=relu'
                    attack='pgd(steps=10)',      # one fixed-budget attack spec
                    epsilon=0.1)                 # in [0, 1] pixel units, norm = eval.norm

`defense=''` disables the sweep. Stochastic defenses (SAP, RSE, noise) are scored with the
Monte-Carlo prediction over `eval.num_draws` draws and attacked with EOT over
`eval.eot_samples` draws (gradient attacks; Square keeps one draw per query, as in
advdef.robustness). The attack differentiates the defense as configured, so
`fixed='surrogate=relu'` makes a JumpReLU sweep a BPDA sweep (the forward pass is the same).
Every grid point sees the same examples and the same keys (common random numbers), so
differences along the grid are not sampling noise of the attack or the draws.

Output: `evaluate_sweeps(...)` returns report['sweeps'] rows in advdef.reporting's schema
(`defense, param, values, clean_accuracy, robust_accuracy, attack, epsilon`), which
`reporting.write_report` renders as a table in report.md and as
`sweep_<defense>_<param>.png`.

  spec = sweeps.parse_sweep_config(config.eval)          # None when disabled
  evaluator = sweeps.SweepEvaluator(model, variables, spec)
  clean, robust = evaluator.accuracies(images_u8, labels, key)   # float[G] each
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import defenses
from advdef import retrofit
from advdef import runs

# Numeric hyperparameters that can be traced, per defense registry name. Structural ones
# (placement, sampler, surrogate, sites) change the graph and belong in `fixed`.
SWEEPABLE: dict[str, tuple[str, ...]] = {
    'jump': ('kappa',),
    'sap': ('frac',),
    'rse': ('sigma_init', 'sigma_inner'),
    'noise': ('sigma',),
}
# frac = 0 draws nothing (every unit pruned); the others are >= 0 by definition.
_STRICTLY_POSITIVE = {('sap', 'frac')}
# `max_frac` is derived from the grid (it fixes a shape); `eps`, `norm` come from the sweep.
_RESERVED_FIXED = ('max_frac',)
_RESERVED_ATTACK = ('eps', 'norm', 'eot_samples', 'return_success')


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A validated in-graph sweep.

  Attributes:
    defense: the defense registry name ('jump', 'sap', 'rse', 'noise').
    param: the swept hyperparameter, one of SWEEPABLE[defense].
    values: the grid, Python floats (G of them).
    fixed: static keyword arguments of the other hyperparameters.
    attack: the attack spec as written (compact), e.g. 'pgd(steps=10)'.
    attack_name: its registry name in advdef.attacks.ATTACKS.
    attack_kwargs: its static hyperparameters (without eps / norm / eot_samples).
    epsilon: the attack budget in [0, 1] pixel units.
    norm: 'linf' or 'l2' (eval.norm).
    stochastic: whether the defense draws randomness (MC prediction, EOT).
    num_draws: Monte-Carlo draws for the prediction of a stochastic defense.
    eot_samples: EOT draws per gradient for a stochastic defense (gradient attacks only).
  """
  defense: str
  param: str
  values: tuple[float, ...]
  fixed: dict[str, Any]
  attack: str
  attack_name: str
  attack_kwargs: dict[str, Any]
  epsilon: float
  norm: str = 'linf'
  stochastic: bool = False
  num_draws: int = 1
  eot_samples: int = 1

  @property
  def uses_eot(self) -> bool:
    # As advdef.robustness plans it: EOT for gradient attacks; Square keeps one draw per
    # query and AutoAttack-rand brings its own EOT.
    from advdef import robustness  # Lazy: robustness imports the evaluation stack.
    accepts = 'eot_samples' in inspect.signature(attacks.ATTACKS[self.attack_name]).parameters
    return (self.stochastic and accepts and self.attack_name in robustness.GRADIENT_ATTACKS
            and self.attack_name != 'autoattack_rand')

  @property
  def defense_label(self) -> str:
    """'jump', or 'jump(surrogate=relu)' when fixed hyperparameters are given."""
    if not self.fixed:
      return self.defense
    args = ','.join(f'{k}={v}' for k, v in self.fixed.items())
    return f'{self.defense}({args})'

  @property
  def attack_label(self) -> str:
    """The attack as shown in the report, e.g. 'pgd(steps=10)+eot4' for stochastic ones."""
    return f'{self.attack}+eot{self.eot_samples}' if self.uses_eot else self.attack

  def defense_kwargs(self, value) -> dict[str, Any]:
    """Keyword arguments of the defense at one grid value (a float or a tracer)."""
    kwargs = {self.param: value, **self.fixed}
    if self.defense == 'sap' and self.fixed.get('sampler', 'exact') == 'exact':
      # A traced frac cannot size the sampler's draws; the largest grid value does (and a
      # separate evaluation with the same max_frac draws the same prefix-stable stream).
      kwargs['max_frac'] = max(self.values)
    return kwargs

  def attack_call_kwargs(self) -> dict[str, Any]:
    kwargs = dict(self.attack_kwargs, norm=self.norm)
    if self.uses_eot:
      kwargs['eot_samples'] = self.eot_samples
    return kwargs


def _field(name: str) -> str:
  return f'eval.sweep.{name}'


def parse_sweep_config(e) -> SweepSpec | None:
  """Validates `eval.sweep` and returns its SweepSpec, or None when `defense` is ''.

  Args:
    e: the `eval` ConfigDict (reads e.sweep, e.norm, e.num_draws, e.eot_samples).

  Raises:
    ValueError: naming the eval.sweep field and the valid choices, before any compute.
  """
  s = e.sweep
  if not s.defense:
    return None
  if s.defense not in SWEEPABLE:
    raise ValueError(f'{_field("defense")}={s.defense!r} cannot be swept; valid defenses: '
                     f'{", ".join(SWEEPABLE)} (or "" to disable the sweep)')
  valid_params = SWEEPABLE[s.defense]
  if s.param not in valid_params:
    raise ValueError(f'{_field("param")}={s.param!r} is not a sweepable hyperparameter of '
                     f'{s.defense!r}; valid choices: {", ".join(valid_params)}')
  raw = s['values']  # Not s.values: ConfigDict.values is a method.
  values = tuple(raw) if isinstance(raw, (tuple, list)) else None
  if not values:
    raise ValueError(f'{_field("values")}={raw!r}: give a non-empty tuple of numbers, '
                     f'e.g. (0.0, 0.5, 1.0)')
  allow_zero = (s.defense, s.param) not in _STRICTLY_POSITIVE
  for v in values:
    config_utils.check_positive(_field('values'), v, allow_zero=allow_zero)
  if len(set(values)) != len(values):
    raise ValueError(f'{_field("values")}={values!r} has duplicates; give each value once')
  values = tuple(float(v) for v in values)

  fixed: dict[str, Any] = {}
  if s.fixed and s.fixed.strip():
    parsed = config_utils.parse_spec(f'{s.defense}({s.fixed})', field=_field('fixed'))
    fixed = parsed[0][1]
  if s.param in fixed:
    raise ValueError(f'{_field("fixed")}={s.fixed!r} sets {s.param!r}, the swept '
                     f'hyperparameter; it comes from {_field("values")}')
  for reserved in _RESERVED_FIXED:
    if reserved in fixed:
      raise ValueError(f'{_field("fixed")}={s.fixed!r}: {reserved!r} is derived from the grid '
                       '(max of the values); remove it')
  # Build the defense concretely at every grid value: bad names, arguments and choices
  # surface here with retrofit's own message.
  transforms = []
  for v in values:
    transforms = retrofit.make_transforms([(s.defense, {s.param: v, **fixed})],
                                          field=_field('fixed'))
  stochastic = any(t.stochastic for t in transforms)

  config_utils.check_choice('eval.norm', e.norm, attacks.NORMS)
  config_utils.check_positive(_field('epsilon'), s.epsilon, allow_zero=True)
  if e.norm == 'linf' and s.epsilon > 1:
    raise ValueError(f'{_field("epsilon")}={s.epsilon}: exceeds 1; epsilons are in [0, 1] '
                     'pixel units')
  from advdef import robustness  # Lazy: robustness imports the evaluation stack.
  (attack, name, attack_kwargs), = robustness.parse_attacks((s.attack,), field=_field('attack'))
  if name in robustness.MIN_PERTURBATION_ATTACKS:
    fixed_budget = [n for n in attacks.ATTACKS if n not in robustness.MIN_PERTURBATION_ATTACKS]
    raise ValueError(f'{_field("attack")}={s.attack!r} is a minimum-perturbation attack; a '
                     f'sweep needs a fixed-budget one: {", ".join(fixed_budget)}')
  if e.norm not in attacks.ATTACK_NORMS[name]:
    raise ValueError(f'{_field("attack")}={s.attack!r} does not support eval.norm={e.norm!r}; '
                     f'it supports {attacks.ATTACK_NORMS[name]}')
  config_utils.check_positive('eval.num_draws', e.num_draws, integer=True)
  config_utils.check_positive('eval.eot_samples', e.eot_samples, integer=True)
  spec = SweepSpec(defense=s.defense, param=s.param, values=values, fixed=fixed, attack=attack,
                   attack_name=name, attack_kwargs=attack_kwargs, epsilon=float(s.epsilon),
                   norm=e.norm, stochastic=stochastic, num_draws=int(e.num_draws),
                   eot_samples=int(e.eot_samples))
  # Trace the attack abstractly on a toy linear model, so bad attack hyperparameters
  # (steps=0, loss=foo) fail now, not after training.
  x = jnp.zeros((2, 2, 2, 1))
  y = jnp.zeros((2,), jnp.int32)
  w = jnp.ones((4, 3))
  toy = lambda x, key: x.reshape((x.shape[0], -1)) @ w
  try:
    jax.eval_shape(lambda: attacks.ATTACKS[name](toy, jax.random.key(0), x, y,
                                                 eps=spec.epsilon, **spec.attack_call_kwargs()))
  except (TypeError, ValueError) as err:
    raise ValueError(f'{_field("attack")}={s.attack!r}: {err}') from None
  return spec


def validate_sweep_config(e) -> None:
  """Checks `eval.sweep` before any compute (see parse_sweep_config); '' defense is a no-op."""
  parse_sweep_config(e)


def validate_for_model(e, model, input_shape) -> None:
  """Checks that the swept defense (with its `sites=` glob, if any) matches the model."""
  spec = parse_sweep_config(e)
  if spec is None:
    return
  kwargs = ', '.join(f'{k}={v!r}' for k, v in spec.defense_kwargs(spec.values[0]).items())
  retrofit.validate_for_model(f'{spec.defense}({kwargs})', model, input_shape,
                              field='eval.sweep')


# ------------------------------------------------------------------------------------------
# The compiled evaluation of one grid point, and of the whole grid.


def _predict(logits_fn, x, key, spec: SweepSpec) -> jax.Array:
  """int32[B]: the defense's decision rule (MC average of softmaxes when stochastic)."""
  if spec.stochastic:
    probs, _ = defenses.mc_probabilities(logits_fn, key, x, num_draws=spec.num_draws)
  else:
    probs = jax.nn.softmax(logits_fn(x, key).astype(jnp.float32), axis=-1)
  return jnp.argmax(probs, axis=-1)


def point_counts(model, variables, spec: SweepSpec, value, x, y, mask, key
                 ) -> tuple[jax.Array, jax.Array]:
  """Clean and robust correct counts of one batch at one grid value (traceable).

  Args:
    model: a registry model (advdef.models) with sites.
    variables: its trained variables.
    spec: the sweep.
    value: the hyperparameter value, a Python float or a scalar tracer.
    x: float32[B, H, W, C] in [0, 1].
    y: int32[B] labels.
    mask: bool[B], False for padding rows.
    key: typed PRNG key; split into attack, clean-scoring and robust-scoring keys.

  Returns:
    (clean_correct, robust_correct): int32 scalars, counts over the masked rows.
  """
  hook = retrofit.Retrofit(retrofit.make_transforms([(spec.defense, spec.defense_kwargs(value))],
                                                    field='eval.sweep'))
  logits_fn = retrofit.make_logits_fn(model, variables, hook)
  attack_key, clean_key, robust_key = jax.random.split(key, 3)
  clean_pred = _predict(logits_fn, x, clean_key, spec)
  x_adv = attacks.ATTACKS[spec.attack_name](logits_fn, attack_key, x, y, eps=spec.epsilon,
                                            **spec.attack_call_kwargs())
  robust_pred = _predict(logits_fn, x_adv, robust_key, spec)
  count = lambda pred: jnp.sum((pred == y) & mask, dtype=jnp.int32)
  return count(clean_pred), count(robust_pred)


def _grid_mesh(num_points: int, devices: Sequence[Any] | None = None
               ) -> jax.sharding.Mesh | None:
  """A 1-D mesh named 'grid' over the devices, when there are several and they divide G."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) > 1 and num_points % len(devices) == 0:
    return jax.sharding.Mesh(np.asarray(devices), ('grid',))
  return None


def _put(tree, sharding):
  """Places host or device arrays on a (possibly multi-process) sharding.

  Host arrays, identical on every process, go through make_array_from_callback, which
  needs no communication; device arrays (e.g. variables replicated over another mesh) are
  moved with device_put.
  """
  def put(a):
    if isinstance(a, jax.Array):
      return jax.device_put(a, sharding)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  return jax.tree_util.tree_map(put, tree)


class SweepEvaluator:
  """The whole grid in one jitted, vmapped function, traced once for every batch.

  The variables are an argument of the compiled function, not a closed-over constant, so
  XLA cannot constant-fold the model differently at different grid values. `trace_count`
  counts traces of the grid function (1 after any number of batches of one shape), which
  the tests use to show that the grid never recompiles per value.

  Args:
    model: a registry model with sites.
    variables: its variables.
    spec: the sweep.
    shard: shard the grid axis over `devices` when there are several and they divide G.
    devices: the devices of the 'grid' mesh (default: all of them).
  """

  def __init__(self, model, variables, spec: SweepSpec, *, shard: bool = True,
               devices: Sequence[Any] | None = None):
    self.spec = spec
    self.trace_count = 0
    self.mesh = _grid_mesh(len(spec.values), devices) if shard else None

    def grid_counts(values, variables, x, y, mask, key):
      self.trace_count += 1  # Runs at trace time only.
      point = lambda v: point_counts(model, variables, spec, v, x, y, mask, key)
      return jax.vmap(point)(values)

    values = np.asarray(spec.values, np.float32)
    if self.mesh is None:
      self._fn = jax.jit(grid_counts)
      self._replicated = None
      self._values = jnp.asarray(values)
      self._variables = variables
    else:
      P = jax.sharding.PartitionSpec
      grid = jax.sharding.NamedSharding(self.mesh, P('grid'))
      self._replicated = jax.sharding.NamedSharding(self.mesh, P())
      # Each device evaluates G / num_devices grid points on the whole batch; outputs are
      # replicated, so every process can read the whole grid's counts.
      self._fn = jax.jit(grid_counts, out_shardings=(self._replicated, self._replicated))
      self._values = _put(values, grid)
      self._variables = _put(variables, self._replicated)

  def batch_counts(self, x, y, mask, key) -> tuple[jax.Array, jax.Array]:
    """int32[G] clean and robust correct counts of one batch at every grid value.

    Args:
      x: float32[B, H, W, C] in [0, 1]; y: int32[B]; mask: bool[B] (False = padding).
      key: typed PRNG key, shared by every grid point.
    """
    if self._replicated is not None:
      x, y, mask, key = _put((x, y, mask, key), self._replicated)
    return self._fn(self._values, self._variables, x, y, mask, key)

  def counts(self, images_u8, labels, key, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Counts over a split in fixed-shape padded batches -> (clean[G], robust[G], n)."""
    clean = robust = None
    for i, batch in enumerate(data_lib.eval_batches(images_u8, labels, batch_size)):
      c, r = self.batch_counts(batch['image'], batch['label'], batch['mask'],
                               jax.random.fold_in(key, i))
      clean = c if clean is None else clean + c
      robust = r if robust is None else robust + r
    return np.asarray(clean), np.asarray(robust), int(labels.shape[0])

  def accuracies(self, images_u8, labels, key, batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray]:
    """float64[G] clean and robust accuracy over a split (uint8 images, int labels)."""
    clean, robust, n = self.counts(images_u8, labels, key, batch_size)
    return clean / n, robust / n


def separate_point_fn(model, variables, spec: SweepSpec, value: float) -> Callable:
  """One grid point as a user would write it: the value a Python constant, jitted alone.

  Returns fn(x, y, mask, key) -> (clean_correct, robust_correct), the same computation and
  keys as one entry of `SweepEvaluator.batch_counts`; each returned function compiles anew
  (the value is baked into its graph).
  """
  fn = jax.jit(lambda variables, x, y, mask, key: point_counts(
      model, variables, spec, float(value), x, y, mask, key))
  return lambda x, y, mask, key: fn(variables, x, y, mask, key)


def separate_accuracies(model, variables, spec: SweepSpec, images_u8, labels, key,
                        batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The reference: a Python loop over the grid, one compiled evaluation per value."""
  clean, robust = [], []
  for value in spec.values:
    fn = separate_point_fn(model, variables, spec, value)
    c = r = 0
    for i, batch in enumerate(data_lib.eval_batches(images_u8, labels, batch_size)):
      bc, br = fn(batch['image'], batch['label'], batch['mask'], jax.random.fold_in(key, i))
      c, r = c + int(bc), r + int(br)
    clean.append(c / labels.shape[0])
    robust.append(r / labels.shape[0])
  return np.asarray(clean), np.asarray(robust)


def sweep_row(spec: SweepSpec, clean: Sequence[float], robust: Sequence[float]) -> dict[str, Any]:
  """A report['sweeps'] entry in advdef.reporting's schema."""
  return {'defense': spec.defense_label, 'param': spec.param, 'values': list(spec.values),
          'clean_accuracy': [float(a) for a in clean],
          'robust_accuracy': [float(a) for a in robust],
          'attack': spec.attack_label, 'epsilon': spec.epsilon}


def evaluate_sweeps(config, model, variables, images_u8, labels, key) -> list[dict[str, Any]]:
  """report['sweeps'] for config.eval.sweep: [] when disabled, else one row.

  Both accuracies are measured on the first `eval.num_attack_examples` examples (all of
  `images_u8` when 0), so the clean and robust curves describe the same examples.

  Args:
    config: the experiment config.
    model, variables: the trained registry model.
    images_u8: uint8[N, H, W, C] evaluation images (already cut to eval.num_examples).
    labels: int[N].
    key: typed PRNG key for the attack and the draws.
  """
  e = config.eval
  spec = parse_sweep_config(e)
  if spec is None:
    return []
  n = e.num_attack_examples or len(labels)
  images_u8, labels = images_u8[:n], np.asarray(labels[:n]).astype(np.int32)
  t0 = time.time()
  # Respect a device budget of the data-parallel config (advdef.parallel), if any.
  num_devices = config.get('parallel', {}).get('num_devices', 0) or jax.device_count()
  evaluator = SweepEvaluator(model, variables, spec, devices=jax.devices()[:num_devices])
  clean, robust = evaluator.accuracies(images_u8, labels, key, e.batch_size)
  _log(f'sweep {spec.defense_label} over {spec.param} ({len(spec.values)} values, '
       f'{spec.attack_label} at eps={spec.epsilon:g}): {time.time() - t0:.1f} s')
  return [sweep_row(spec, clean, robust)]


def _log(message: str) -> None:
  # Progress for people watching a long evaluation, as advdef.robustness reports it.
  print(f'[eval] {message}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Timing: one vmapped call against separate compiled calls (scripts/benchmark.py).

DEFAULT_KAPPAS = tuple(round(0.2 * i, 1) for i in range(10))  # 0.0 .. 1.8


def _block(tree):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def time_sweep_vs_separate(model, variables, spec: SweepSpec, images_u8, labels, key, *,
                           batch_size: int = 256, shard: bool = True) -> dict[str, Any]:
  """Wall time of the grid as one vmapped compiled call vs one compiled call per value.

  Both sides include their compilation, as a user pays it: the sweep compiles once, the
  separate evaluation compiles once per value (the value is a constant of each graph).
  Each side then runs once more, already compiled, for the steady-state times. Both sides
  compute the same counts (asserted).

  Args:
    model, variables: a registry model and its variables.
    spec: the sweep (e.g. from parse_sweep_config).
    images_u8: uint8[N, H, W, C]; labels: int[N].
    key: typed PRNG key.
    batch_size: examples per batch (the last batch is padded and masked).
    shard: shard the grid axis over devices when they divide it.

  Returns:
    dict(in_graph_seconds, separate_seconds, ratio = separate / in_graph, num_points,
    in_graph_run_seconds, separate_run_seconds (compiled, second run), num_examples,
    num_devices, sharded).
  """
  labels = np.asarray(labels).astype(np.int32)
  batches = list(data_lib.eval_batches(images_u8, labels, batch_size))
  keys = [jax.random.fold_in(key, i) for i in range(len(batches))]

  def run_grid(evaluator):
    out = [evaluator.batch_counts(b['image'], b['label'], b['mask'], k)
           for b, k in zip(batches, keys)]
    return np.sum(np.asarray(_block(out)), axis=0)  # [2, G]

  t0 = time.perf_counter()
  evaluator = SweepEvaluator(model, variables, spec, shard=shard)
  grid = run_grid(evaluator)
  in_graph = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_grid(evaluator)
  in_graph_run = time.perf_counter() - t0

  def run_separate(fns):
    out = [[fn(b['image'], b['label'], b['mask'], k) for b, k in zip(batches, keys)]
           for fn in fns]
    return np.sum(np.asarray(_block(out)), axis=1).T  # [2, G]

  t0 = time.perf_counter()
  fns = [separate_point_fn(model, variables, spec, v) for v in spec.values]
  separate = run_separate(fns)
  separate_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_separate(fns)
  separate_run = time.perf_counter() - t0
  if not np.array_equal(grid, separate):
    _log(f'in-graph and separate counts differ: {grid.tolist()} vs {separate.tolist()}')
  return {'in_graph_seconds': in_graph, 'separate_seconds': separate_seconds,
          'ratio': separate_seconds / in_graph, 'num_points': len(spec.values),
          'in_graph_run_seconds': in_graph_run, 'separate_run_seconds': separate_run,
          'num_examples': int(labels.shape[0]), 'num_devices': jax.device_count(),
          'sharded': evaluator.mesh is not None, 'counts_equal': bool(np.array_equal(grid,
                                                                                       separate))}


def benchmark_kappa_sweep(workdir: str | None = None, *,
                          values: Sequence[float] = DEFAULT_KAPPAS,
                          attack: str = 'pgd(steps=10)', epsilon: float = 0.1,
                          num_examples: int = 200, batch_size: int = 200, norm: str = 'linf',
                          seed: int = 0, shard: bool = True) -> dict[str, Any]:
  """Times a JumpReLU kappa sweep (clean + robust accuracy) in one call vs separate calls.

  Args:
    workdir: a trained advdef run (e.g. the quick start's) whose model and test split are
      used; None uses a freshly initialised small_cnn on the bundled digits (offline, no
      training: the timing does not depend on the weights).
    values: the kappa grid (default 0.0, 0.2, ..., 1.8: ten points).
    attack: a fixed-budget attack spec, e.g. 'pgd(steps=10)'.
    epsilon: the attack budget in [0, 1] pixel units.
    num_examples: test examples evaluated (the first ones of the test split).
    batch_size: examples per compiled call.
    norm: 'linf' or 'l2'.
    seed: seed of the initialisation (workdir=None) and of the keys.
    shard: shard the grid over devices when their count divides len(values).

  Returns:
    dict(in_graph_seconds, separate_seconds, ratio, num_points) plus the steady-state
    in_graph_run_seconds / separate_run_seconds and num_examples, num_devices, sharded,
    counts_equal; see time_sweep_vs_separate. ratio > 1 means the in-graph sweep is faster.
  """
  import ml_collections
  if workdir:
    run = runs.load_run(workdir)
    model, variables, splits = run.model, run.variables, run.splits
  else:
    from advdef import models
    splits = data_lib.load_dataset(config_utils.base_config().data)
    info = splits.info
    model = models.create_model('small_cnn', num_classes=info.num_classes, mean=info.mean,
                                std=info.std)
    x0 = jnp.zeros((1, *info.image_shape), jnp.float32)
    variables = model.init({'params': jax.random.key(seed)}, x0, train=False)
  e = ml_collections.ConfigDict(dict(
      sweep=dict(defense='jump', param='kappa', values=tuple(values), fixed='', attack=attack,
                 epsilon=epsilon),
      norm=norm, num_draws=1, eot_samples=1))
  spec = parse_sweep_config(e)
  images = splits.test_images[:num_examples]
  labels = splits.test_labels[:num_examples]
  return time_sweep_vs_separate(model, variables, spec, images, labels,
                                jax.random.key(seed + 1), batch_size=batch_size, shard=shard)
