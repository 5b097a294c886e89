"""Adversarial attacks in [0, 1] pixel space, written for JAX transformations.

Every attack has the project-wide role signature

    attack(logits_fn, key, x, y, **hparams) -> x_adv

* `logits_fn(x, key) -> float32[B, K]` is the model as the attacker sees it. `x` is
  float32[B, H, W, C] in [0, 1]; `key` drives the model's own randomness (SAP masks, RSE
  noise). Deterministic models ignore it. Input normalisation lives inside `logits_fn`.
* `key` is a typed key (`jax.random.key`). An attack derives every random number it needs,
  including the keys it hands to `logits_fn`, from this key alone (split / fold_in, never
  reused), so attack randomness is independent of whatever keys the evaluator uses.
* `y` is int32[B], the true labels. All attacks are untargeted.
* Every epsilon is in [0, 1] pixel units. Fixed-budget attacks return points that lie
  exactly inside the epsilon ball and the [0, 1] box (see "Exact constraints" below).
* Numeric hyperparameters (eps, step sizes, learning rates, overshoot, ...) are traced:
  changing them does not recompile (switching an optional one between None and a number
  does, since that changes the argument structure). Structural ones (steps, restarts, norm,
  loss, queries, eot_samples, ...) are static Python values; bind them with
  `functools.partial` before `jax.jit`. Library functions are not jitted themselves ("jit
  at the top").
* Loops run inside the trace (`lax.fori_loop` / `lax.while_loop`), so there is no host sync
  per step, and outputs carry `lax.stop_gradient`.
* Invalid hyperparameters raise `ValueError` naming the field (`pgd.eps`; the checks are
  `advdef.validate`'s) before any compute. Checks on values are skipped for tracers (e.g.
  eps under `jax.jit`).

Components
----------
Losses (per example, `loss(logits, y) -> float32[B]`). Sign convention: LARGER = MORE
ADVERSARIAL; attacks maximise them, and `margin > 0` exactly when the example is
misclassified.
  cross_entropy, margin (C&W: max_{j!=y} z_j - z_y), dlr (Croce & Hein 2020),
  dlr_targeted; registry `LOSSES` (aliases 'ce' and 'cw'), `get_loss`.
Fixed-budget attacks (eps ball):
  fgsm             single step, L-inf (FGSM) or L2 (FGM), optional random start.
  pgd              L-inf / L2, random start, vectorised restarts, best-iterate tracking.
  apgd             Auto-PGD (Croce & Hein 2020), CE or DLR loss, L-inf / L2, restarts.
  apgd_targeted    APGD-T: targeted DLR against the top `num_target_classes` classes.
  square           Square Attack (Andriushchenko et al. 2020), score based, L-inf / L2.
  autoattack_standard, autoattack_rand   AutoAttack-style suites (per-example worst case).
Minimum-perturbation attacks (no eps ball; report norms with `perturbation_norms`):
  cw_l2            Carlini & Wagner L2 with binary search over c (optional eps projection).
  deepfool         DeepFool, L2 and L-inf, top-k candidate classes.
  ifgsm_min        The JumpReLU paper's iterative FGSM that stops per example once fooled.
  trust_region     TR (Yao et al. 2019) as the JumpReLU code runs it: fixed closest target,
                   linearised steps capped at a trust radius, L2 and L-inf.
Adaptive-attack tools:
  eot_logits_fn    EOT over a stochastic model (mean logits or log of mean softmax);
                   attacks also take `eot_samples` / `eot_average` (default: mean of
                   the per-draw losses), vectorised with vmap inside the compiled loop.
                   Success tests (best iterate, restarts, early stops) then use the
                   draws' mean logits, not one lucky draw (cf. AutoAttack PRs #104/#105).
  fixed_randomness Freezes the model's randomness to one key (the literature's check).
  transfer_attack  Crafts on a source model, ignoring the attacked (target) model.
  BPDA             Nothing to do here: the defense exposes its surrogate backward pass
                   (e.g. `jax.custom_vjp`, or `h + stop_gradient(f(h) - h)`) inside its
                   `logits_fn`, and every gradient attack differentiates whatever
                   `logits_fn` it is given, so it follows the surrogate.
Registry and helpers:
  ATTACKS, ATTACK_NORMS, get_attack, perturbation_norms, relative_perturbation_norms.

Exact constraints
-----------------
L-inf results satisfy `|x_adv - x| <= eps` elementwise when the difference and the
comparison are done in float32 (numpy or JAX) and also against the float64 value of eps:
the attack clips to the float32 number just below float32(eps) and nudges any coordinate
whose float32 difference still rounds above it one ulp back towards x. L2 results are the
Euclidean projection onto the intersection of the ball of radius `eps * (1 - 2**-16)` and
the box (`geometry.project_l2`: exact to float32, not "scale into the ball, then clip",
which is not the nearest point when the box binds); the slack absorbs the rounding of the
difference and of the norm's summation (numpy's pairwise order, float64, ...). The realised
norm is then
re-measured once and, where the float32 rounding of `x + delta` pushed it over, scaled to
`sqrt(n) * 2**-25` below that bound, the most that rounding can add back (n = H * W * C).

Example
-------
    import functools, jax
    from advdef import attacks

    logits_fn = lambda x, key: model.apply(variables, x, rngs={'defense': key})
    attack = jax.jit(functools.partial(
        attacks.pgd, logits_fn, steps=100, restarts=10, norm='linf', loss='margin',
        eot_samples=10))
    key = jax.random.key(0)
    x_adv = attack(key, x, y, eps=8 / 255)   # eps is traced: a new eps does not recompile
    robust_acc = (logits_fn(x_adv, eval_key).argmax(-1) == y).mean()

    # The same by name, e.g. from a config:
    apgd = attacks.get_attack('apgd')
    x_adv = jax.jit(functools.partial(apgd, logits_fn, loss='dlr', steps=100))(
        key, x, y, eps=0.3)

Loop lowering (measured)
------------------------
Every iterative attack runs its steps in one rolled `lax.fori_loop` / `lax.while_loop`, so
its program does not grow with `steps` (PGD-1000 compiles like PGD-10). On XLA:CPU that loop
first ran 5.3x slower than the same step jitted alone and called from Python (PGD-20,
ResNet-20). The cause, found by comparing the optimised HLO of the loop body with the step
compiled alone: the input gradient of a convolution is a convolution whose kernel has its
feature axes swapped ('01oi'); XLA:CPU rewrites it into the layout of its fast Eigen kernel
only in the entry computation, so inside a loop body it ran on a generic kernel.
`advdef.layers.canonical_conv` hands that convolution a kernel transposed in memory, so its
layout is canonical wherever it is compiled (tests/models_test.py checks a compiled rolled
loop). `scripts/benchmark.py`'s `loops` section measures, per family, the marginal cost of
one more iteration inside the attack's own loop against the same model work jitted alone
(lenet_like, batch 32, 2 CPU cores, 2026-11-28): PGD 1.05x, EOT-PGD 0.94x, APGD-CE 0.98x,
Square 0.89x, C&W-L2 0.97x, DeepFool 1.11x, IFGSM-min 0.87x, TR 0.97x, PGD-AT's crafting
0.78x (run-to-run noise is about +-15%); ResNet-20 PGD-20 rolled runs at 1.04x the speed of
its step alone in a Python loop. Unrolling (`unroll=True`) gives the same iterates bit for bit
and, since this fix, 3-8% per step on CPU for 1.2-1.8x the compile time. Not measured on a
GPU here (no GPU was available to this work).

Modules
-------
The package is split by family; import the attacks from the package itself.
  losses        the losses, LOSSES / get_loss, the shared types.
  geometry      norms, exact projections, random starts, perturbation norms, shared checks.
  adaptive      eot_logits_fn, fixed_randomness, transfer_attack.
  gradient      fgsm, pgd, apgd, apgd_targeted and the shared objective / restart code.
  score_based   square.
  minimum_norm  cw_l2, deepfool, ifgsm_min, trust_region.
  suites        autoattack_standard, autoattack_rand.
This module adds the registry (ATTACKS, ATTACK_NORMS, get_attack).
"""

from __future__ import annotations

from advdef.attacks.adaptive import eot_logits_fn
from advdef.attacks.adaptive import fixed_randomness
from advdef.attacks.adaptive import transfer_attack
from advdef.attacks.geometry import EOT_AVERAGES
from advdef.attacks.geometry import NORMS
from advdef.attacks.geometry import perturbation_norms
from advdef.attacks.geometry import relative_perturbation_norms
from advdef.attacks.gradient import apgd
from advdef.attacks.gradient import apgd_targeted
from advdef.attacks.gradient import fgsm
from advdef.attacks.gradient import pgd
from advdef.attacks.losses import Array
from advdef.attacks.losses import AttackFn
from advdef.attacks.losses import cross_entropy
from advdef.attacks.losses import dlr
from advdef.attacks.losses import dlr_targeted
from advdef.attacks.losses import get_loss
from advdef.attacks.losses import LogitsFn
from advdef.attacks.losses import LOSSES
from advdef.attacks.losses import LossFn
from advdef.attacks.losses import margin
from advdef.attacks.minimum_norm import cw_l2
from advdef.attacks.minimum_norm import deepfool
from advdef.attacks.minimum_norm import ifgsm_min
from advdef.attacks.minimum_norm import trust_region
# The module is score_based, not square: a submodule `square` would shadow the function.
from advdef.attacks.score_based import square
from advdef.attacks.suites import autoattack_rand
from advdef.attacks.suites import autoattack_standard

__all__ = [
    'ATTACKS', 'ATTACK_NORMS', 'EOT_AVERAGES', 'LOSSES', 'NORMS', 'apgd', 'apgd_targeted',
    'autoattack_rand', 'autoattack_standard', 'cross_entropy', 'cw_l2', 'deepfool', 'dlr',
    'dlr_targeted', 'eot_logits_fn', 'fgsm', 'fixed_randomness', 'get_attack', 'get_loss',
    'ifgsm_min', 'margin', 'perturbation_norms', 'pgd', 'relative_perturbation_norms',
    'square', 'transfer_attack', 'trust_region',
]

ATTACKS: dict[str, AttackFn] = {
    'fgsm': fgsm,
    'pgd': pgd,
    'apgd': apgd,
    'apgd_targeted': apgd_targeted,
    'square': square,
    'autoattack_standard': autoattack_standard,
    'autoattack_rand': autoattack_rand,
    'cw_l2': cw_l2,
    'deepfool': deepfool,
    'ifgsm_min': ifgsm_min,
    'trust_region': trust_region,
}

# The norms each attack supports (its `norm` argument).
ATTACK_NORMS: dict[str, tuple[str, ...]] = {
    'fgsm': NORMS,
    'pgd': NORMS,
    'apgd': NORMS,
    'apgd_targeted': NORMS,
    'square': NORMS,
    'autoattack_standard': NORMS,
    'autoattack_rand': NORMS,
    'cw_l2': ('l2',),
    'deepfool': NORMS,
    'ifgsm_min': ('linf',),
    'trust_region': NORMS,
}


def get_attack(name: str) -> AttackFn:
  """Looks up an attack by name.

  Raises:
    ValueError: listing the valid names if `name` is unknown.
  """
  if name not in ATTACKS:
    raise ValueError(f'attack must be one of {sorted(ATTACKS)}, got {name!r}')
  return ATTACKS[name]
