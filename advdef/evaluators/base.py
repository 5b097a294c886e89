"""What every evaluator receives: the run's Context, with the config's specs parsed once."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from advdef import attacks
from advdef import retrofit
from advdef import rng


# Attack families, as the suite plans them (advdef.evaluators.attack_suite).
MIN_PERTURBATION_ATTACKS = ('cw_l2', 'deepfool', 'ifgsm_min')
GRADIENT_ATTACKS = ('fgsm', 'pgd', 'apgd', 'apgd_targeted', 'autoattack_standard',
                    'autoattack_rand', 'cw_l2', 'deepfool', 'ifgsm_min')
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
  """
  config: ml_collections.ConfigDict
  plan: EvalPlan
  model: nn.Module
  variables: Any
  images: np.ndarray
  labels: np.ndarray
  mesh: jax.sharding.Mesh
  workdir: str | None = None

  def key(self, evaluator: str) -> jax.Array:
    """The evaluator's own PRNG stream (advdef.rng.EVAL_STREAMS)."""
    return rng.eval_key(self.config.seed, evaluator)


def log(message: str) -> None:
  # Progress for people watching a long evaluation; absl's INFO is silenced for orbax.
  print(f'[eval] {message}', file=sys.stderr, flush=True)
