"""In-graph hyperparameter sweeps: a grid of one defense hyperparameter in ONE compiled call.

A sweep evaluates one defense at every value of a grid of one of its numeric hyperparameters
(JumpReLU's kappa, SAP's frac, RSE's sigma_init / sigma_inner, the noise baseline's sigma):
clean accuracy, and robust accuracy under one attack at one epsilon. The defense is built
inside a function of the traced value, the function is `jax.vmap`ped over the grid axis and
jitted once, so a 10-point grid costs one compilation instead of ten (timed by
scripts/benchmark.py). With several devices, and a grid whose length they divide, the grid
axis is sharded over a 1-D mesh named 'grid'.

Config (`eval.sweep`, see advdef.config_utils.base_config):

  eval.sweep = dict(defense='jump', param='kappa', values=(0.0, 0.2, ..., 1.8),
                    fixed='',                    # the other hyperparameters, 'surrogate=relu'
                    attack='pgd(steps=10)',      # one fixed-budget attack spec
                    epsilon=0.1)                 # in [0, 1] pixel units, norm = eval.norm

`defense=''` disables the sweep. Stochastic defenses (SAP, RSE, noise) are scored with the
Monte-Carlo prediction over `eval.num_draws` draws and attacked with EOT over
`eval.eot_samples` draws (gradient attacks; Square keeps one draw per query, as in
advdef.evaluators.attack_suite). The attack differentiates the defense as configured, so
`fixed='surrogate=relu'` makes a JumpReLU sweep a BPDA sweep (the forward pass is the same).
Every grid point sees the same examples and the same keys (common random numbers), so
differences along the grid are not sampling noise of the attack or the draws.

Output: `evaluate(ctx)` returns report['sweeps'] rows in advdef.reporting's schema
(`defense, param, values, clean_accuracy, robust_accuracy, attack, epsilon`), which
`reporting.write_report` renders as a table in report.md and as
`sweep_<defense>_<param>.png`.

  spec = defense_sweep.parse_sweep_config(config.eval)   # None when disabled
  evaluator = defense_sweep.SweepEvaluator(model, variables, spec)
  clean, robust = evaluator.accuracies(images_u8, labels, key)   # float[G] each
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import evaluation
from advdef import parallel
from advdef import retrofit
from advdef import validate
from advdef.evaluators import attack_suite
from advdef.evaluators import base
from advdef.evaluators import results

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
    # As the attack suite plans it: EOT for gradient attacks; Square keeps one draw per
    # query and AutoAttack-rand brings its own EOT.
    return (self.stochastic and base.accepts(self.attack_name, 'eot_samples')
            and self.attack_name in base.GRADIENT_ATTACKS
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
    validate.check_positive(_field('values'), v, allow_zero=allow_zero)
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

  validate.check_choice('eval.norm', e.norm, attacks.NORMS)
  validate.check_positive(_field('epsilon'), s.epsilon, allow_zero=True)
  if e.norm == 'linf' and s.epsilon > 1:
    raise ValueError(f'{_field("epsilon")}={s.epsilon}: exceeds 1; epsilons are in [0, 1] '
                     'pixel units')
  parsed, = attack_suite.parse_attacks((s.attack,), field=_field('attack'))
  attack, name, attack_kwargs = parsed.label, parsed.name, parsed.kwargs
  if name in base.MIN_PERTURBATION_ATTACKS:
    fixed_budget = [n for n in attacks.ATTACKS if n not in base.MIN_PERTURBATION_ATTACKS]
    raise ValueError(f'{_field("attack")}={s.attack!r} is a minimum-perturbation attack; a '
                     f'sweep needs a fixed-budget one: {", ".join(fixed_budget)}')
  if e.norm not in attacks.ATTACK_NORMS[name]:
    raise ValueError(f'{_field("attack")}={s.attack!r} does not support eval.norm={e.norm!r}; '
                     f'it supports {attacks.ATTACK_NORMS[name]}')
  validate.check_positive('eval.num_draws', e.num_draws, integer=True)
  validate.check_positive('eval.eot_samples', e.eot_samples, integer=True)
  spec = SweepSpec(defense=s.defense, param=s.param, values=values, fixed=fixed, attack=attack,
                   attack_name=name, attack_kwargs=attack_kwargs, epsilon=float(s.epsilon),
                   norm=e.norm, stochastic=stochastic, num_draws=int(e.num_draws),
                   eot_samples=int(e.eot_samples))
  # Bad attack hyperparameters (steps=0, loss=foo) fail now, not after training.
  attack_suite.check_attack_call(f'{_field("attack")}={s.attack!r}', name,
                                 dict(spec.attack_call_kwargs(), eps=spec.epsilon))
  return spec


def validate_for_model(spec: SweepSpec, model, input_shape) -> None:
  """Checks that the swept defense (with its `sites=` glob, if any) matches the model."""
  kwargs = ', '.join(f'{k}={v!r}' for k, v in spec.defense_kwargs(spec.values[0]).items())
  retrofit.validate_for_model(f'{spec.defense}({kwargs})', model, input_shape,
                              field='eval.sweep')


# ------------------------------------------------------------------------------------------
# The compiled evaluation of one grid point, and of the whole grid.


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
  predict = lambda x, key: jnp.argmax(evaluation.predict_probs(
      logits_fn, x, key, stochastic=spec.stochastic, num_draws=spec.num_draws)[0], axis=-1)
  clean_pred = predict(x, clean_key)
  x_adv = attacks.ATTACKS[spec.attack_name](logits_fn, attack_key, x, y, eps=spec.epsilon,
                                            **spec.attack_call_kwargs())
  robust_pred = predict(x_adv, robust_key)
  count = lambda pred: jnp.sum((pred == y) & mask, dtype=jnp.int32)
  return count(clean_pred), count(robust_pred)


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
    self.mesh = parallel.grid_mesh(len(spec.values), devices) if shard else None

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
      self._values = parallel.put(values, grid)
      self._variables = parallel.put(variables, self._replicated)

  def batch_counts(self, x, y, mask, key) -> tuple[jax.Array, jax.Array]:
    """int32[G] clean and robust correct counts of one batch at every grid value.

    Args:
      x: float32[B, H, W, C] in [0, 1]; y: int32[B]; mask: bool[B] (False = padding).
      key: typed PRNG key, shared by every grid point.
    """
    if self._replicated is not None:
      x, y, mask, key = parallel.put((x, y, mask, key), self._replicated)
    return self._fn(self._values, self._variables, x, y, mask, key)

  def counts(self, images_u8, labels, key, batch_size: int, on_batch=None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """Counts over a split in fixed-shape padded batches -> (clean[G], robust[G], n).

    on_batch(done, total) is called as batches finish (evaluation.BatchTicker).
    """
    clean = robust = None
    tick = evaluation.BatchTicker(on_batch, evaluation.num_batches(len(labels), batch_size))
    for i, batch in enumerate(data_lib.eval_batches(images_u8, labels, batch_size)):
      c, r = self.batch_counts(batch['image'], batch['label'], batch['mask'],
                               jax.random.fold_in(key, i))
      clean = c if clean is None else clean + c
      robust = r if robust is None else robust + r
      tick(robust)
    tick.finish()
    return np.asarray(clean), np.asarray(robust), int(labels.shape[0])

  def accuracies(self, images_u8, labels, key, batch_size: int = 256, on_batch=None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """float64[G] clean and robust accuracy over a split (uint8 images, int labels)."""
    clean, robust, n = self.counts(images_u8, labels, key, batch_size, on_batch)
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


def evaluate(ctx: base.Context) -> dict[str, Any]:
  """{'sweeps': [one row]} for eval.sweep, {} when it is off.

  Both accuracies are measured on the first `eval.num_attack_examples` examples (all of
  ctx's when 0), so the clean and robust curves describe the same examples. The grid axis
  is sharded over the devices of the run's mesh when their count divides it.
  """
  e, spec = ctx.config.eval, ctx.plan.sweep
  if spec is None:
    return {}
  n = e.num_attack_examples or len(ctx.labels)
  images_u8, labels = ctx.images[:n], np.asarray(ctx.labels[:n]).astype(np.int32)
  key = ctx.key('defense_sweep')
  # The whole section is one entry (advdef.evaluators.results): a rerun reuses it.
  store = results.open_store(ctx)
  entry_key = {'defense': spec.defense_label, 'param': spec.param, 'values': list(spec.values),
               'attack': spec.attack_label, 'epsilon': spec.epsilon}
  entry = store.get('defense_sweep', (), entry_key, {'sweep': key})
  reused = entry is not None
  if not reused:
    t0 = time.time()
    label = f'{spec.defense_label} over {spec.param} ({len(spec.values)} values)'
    with base.progress('defense_sweep', unit='sweeps') as bar:
      evaluator = SweepEvaluator(ctx.model, ctx.variables, spec,
                                 devices=list(ctx.mesh.devices.flat))
      clean, robust = evaluator.accuracies(images_u8, labels, key, e.batch_size,
                                           on_batch=base.batch_reporter(bar, 0, 1, label, ''))
    entry = store.put('defense_sweep', (), entry_key, {'sweep': key},
                      {'sweeps': [sweep_row(spec, clean, robust)], 'seconds': time.time() - t0})
  base.log(f'sweep {spec.defense_label} over {spec.param} ({len(spec.values)} values, '
           f'{spec.attack_label} at eps={spec.epsilon:g}): {base.row_seconds(entry.value, reused)}')
  return {'sweeps': entry.value['sweeps']}
