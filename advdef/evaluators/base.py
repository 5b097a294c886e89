"""What every evaluator receives: the run's Context, with the config's specs parsed once."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from advdef import attacks
from advdef import evaluation
from advdef import parallel
from advdef import progress as progress_lib
from advdef import retrofit
from advdef import rng


# Attack families, as the suite plans them (advdef.evaluators.attack_suite).
MIN_PERTURBATION_ATTACKS = ('cw_l2', 'deepfool', 'ifgsm_min', 'trust_region')
GRADIENT_ATTACKS = ('fgsm', 'pgd', 'apgd', 'apgd_targeted', 'autoattack_standard',
                    'autoattack_rand', 'cw_l2', 'deepfool', 'ifgsm_min', 'trust_region')
ITERATIVE_ATTACKS = ('pgd', 'apgd', 'apgd_targeted', 'autoattack_standard', 'autoattack_rand')


def accepts(name: str, arg: str) -> bool:
  """Whether attack `name` takes keyword argument `arg` (e.g. eot_samples)."""
  return arg in inspect.signature(attacks.ATTACKS[name]).parameters


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One entry of eval.attacks, parsed: label 'pgd(steps=20)', name 'pgd', kwargs."""
  label: str
  name: str
  kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """The eval section's spec strings, parsed and validated once before any compute.

  Attributes:
    defenses: eval.defenses, in order.
    attacks: eval.attacks, in order.
    sweep: the in-graph defense sweep (advdef.evaluators.defense_sweep.SweepSpec) or None.
    vulnerability: eval.vulnerability.attack parsed, or None when off.
  """
  defenses: tuple[retrofit.DefenseSpec, ...]
  attacks: tuple[AttackSpec, ...]
  sweep: Any = None
  vulnerability: AttackSpec | None = None


@dataclasses.dataclass
class Context:
  """The trained run as evaluators see it.

  images: uint8[N, H, W, C] test images (the first eval.num_examples); labels: int32[N].
  mesh: the data-parallel mesh (advdef.parallel); variables are replicated over it.
  workdir: where evaluators may write files; None on processes other than 0.
  memo: what evaluators compute once per run and share (the results store's fingerprint).
  """
  config: ml_collections.ConfigDict
  plan: EvalPlan
  model: nn.Module
  variables: Any
  images: np.ndarray
  labels: np.ndarray
  mesh: jax.sharding.Mesh
  workdir: str | None = None
  # Jitted programs shared by the evaluators, by name (see jit_with_variables).
  programs: dict = dataclasses.field(default_factory=dict, repr=False)
  memo: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def key(self, evaluator: str) -> jax.Array:
    """The evaluator's own PRNG stream (advdef.rng.EVAL_STREAMS)."""
    return rng.eval_key(self.config.seed, evaluator)


def jit_with_variables(model: nn.Module, variables, hook, fn, name: str = 'evaluate',
                       programs: dict | None = None):
  """`fn(logits_fn, *args)` jitted with the variables as an argument -> callable(*args).

  logits_fn is the model with the defense `hook` (advdef.retrofit.make_logits_fn). Closed-over
  variables would be baked into the program as constants: every compilation would then be
  specific to these weights, XLA would spend compile time folding them, and the persistent
  compilation cache could never hit across runs or between evaluators. As an argument, equal
  programs (the same attack on the same defense and shapes) compile once per machine.
  `name` names the program in JAX's compile logs and profiles; with `programs` (a dict, e.g.
  Context.programs) the jitted function is reused by every caller asking for the same name,
  which must then identify fn and hook (e.g. 'predict16_on_sap(frac=1.0)').
  """
  if programs is not None and name in programs:
    return functools.partial(programs[name], variables)

  def run(v, *args):
    return fn(retrofit.make_logits_fn(model, v, hook), *args)

  run.__name__ = re.sub(r'\W+', '_', name).strip('_') or 'evaluate'
  jitted = jax.jit(run)
  if programs is not None:
    programs[name] = jitted
  return functools.partial(jitted, variables)


def predict_program(ctx: 'Context', variables, defense: retrofit.DefenseSpec):
  """predict(x, key) -> (mean_probs, per_draw_probs): the defense's decision rule
  (advdef.evaluation.predict_probs with eval.num_draws), one program per defense for all
  evaluators."""
  num_draws = ctx.config.eval.num_draws
  return jit_with_variables(
      ctx.model, variables, defense.hook,
      lambda logits_fn, x, key: evaluation.predict_probs(
          logits_fn, x, key, stochastic=defense.stochastic, num_draws=num_draws),
      f'predict{num_draws}_on_{defense.text}', ctx.programs)


def eval_batch_size(ctx: 'Context') -> int:
  """eval.batch_size, shrunk to the examples attacked (rounded up to the device count).

  Attacks run on eval.num_attack_examples, often fewer than a batch: padding 100 examples to a
  batch of 200 would double every attack's work. Clean evaluation uses the same batch, so the
  scoring program compiled for one serves the other.
  """
  e = ctx.config.eval
  n = min(e.num_attack_examples or len(ctx.labels), len(ctx.labels))
  devices = 1 if ctx.mesh is None else parallel.num_shards(ctx.mesh)
  return min(e.batch_size, max(devices, -(-n // devices) * devices))


def log(message: str, bar: progress_lib.Progress | None = None) -> None:
  # Progress for people watching a long evaluation; absl's INFO is silenced for orbax.
  # With a status line on the terminal, the line goes above it.
  if bar is not None:
    bar.write(f'[eval] {message}')
  else:
    print(f'[eval] {message}', file=sys.stderr, flush=True)


def row_seconds(row: dict[str, Any], reused: bool) -> str:
  """'6.1 s' for a row's log line; ', reused' when it was read back from eval_results."""
  return f'{row["seconds"]:.1f} s' + (', reused' if reused else '')


def progress(evaluator: str, unit: str = 'rows') -> progress_lib.Progress:
  """The status line of one evaluator on stderr (advdef.progress): drawn on a terminal, by
  process 0 only (one line per host would garble a shared console)."""
  return progress_lib.Progress(f'[eval] {evaluator}', unit=unit,
                               tty=None if jax.process_index() == 0 else False)


def batch_reporter(bar: progress_lib.Progress, done: float, total: int, label: str,
                   phase: str, start: float = 0.0, share: float = 1.0
                   ) -> Callable[[int, int], None]:
  """on_batch(i, n) for an evaluation loop: shows '<phase> batch i/n' under `label`, and
  counts the unit under way as done + start + share * i / n of `total` (for the estimate)."""
  def on_batch(i: int, n: int) -> None:
    bar.update(done + start + share * i / n, total, label, f'{phase} batch {i}/{n}'.strip())
  return on_batch
