"""The adaptive attack suite per defense, per-example worst cases, and sanity checks.

For every defense in `eval.defenses` and every attack spec in `eval.attacks` (at each
epsilon of `eval.epsilons`, or once for minimum-perturbation attacks), the suite adapts to
the defense (`eval.adaptive`):
  - stochastic defenses (SAP, RSE): gradient attacks use EOT over `eval.eot_samples` draws
    (`+eot<k>`), vectorized over keys inside the compiled loop; the first gradient attack
    also runs with one draw per step, as the papers' authors attacked (`+1draw`), when
    `eval.single_draw_baseline`; Square uses one draw per query;
  - JumpReLU: white-box through the exact gradient, BPDA through ReLU's gradient (`+bpda`),
    and transfer from kappa = 0, the paper's gray-box setting (`+transfer(none)`);
  - every defended model: transfer from the undefended model for the first gradient attack.
Adversarial examples are always scored with the defense's own decision rule on fresh draws
(Monte-Carlo average of `eval.num_draws` softmaxes for stochastic defenses); attack keys
and scoring keys come from independent streams.

Checks (Carlini et al. 2019; AutoAttack's flags), each pass / warn / fail with a detail:
  accuracy_monotone_in_eps, large_eps_collapse, iterative_beats_single_step,
  white_box_beats_transfer, square_not_better_than_gradient, convergence,
  gradient_health, randomness_detected, fixed_randomness.

Attacks, scoring and checks run data parallel: every batch is split over the devices of the
`config.parallel` mesh (advdef.parallel) and the variables are replicated.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import evaluation
from advdef import parallel
from advdef import retrofit

MIN_PERTURBATION_ATTACKS = ('cw_l2', 'deepfool', 'ifgsm_min')
GRADIENT_ATTACKS = ('fgsm', 'pgd', 'apgd', 'apgd_targeted', 'autoattack_standard',
                    'autoattack_rand', 'cw_l2', 'deepfool', 'ifgsm_min')
ITERATIVE_ATTACKS = ('pgd', 'apgd', 'apgd_targeted', 'autoattack_standard', 'autoattack_rand')
LARGE_EPS = {'linf': 0.5}  # Carlini et al.: no classifier beats chance at L-inf 0.5.


def _accepts(name: str, arg: str) -> bool:
  return arg in inspect.signature(attacks.ATTACKS[name]).parameters


@dataclasses.dataclass(frozen=True)
class AttackPlan:
  """One attack to run against one defense."""
  label: str            # as shown in the report, e.g. 'pgd(steps=20)+eot8'
  name: str             # attacks registry name
  kwargs: dict          # static hyperparameters (eps is added per epsilon)
  craft_spec: str       # the defense spec whose logits_fn the attack differentiates
  threat: str           # 'white-box', 'white-box EOT-k', 'BPDA', 'transfer from ...'
  base: str             # the attack spec it derives from (for the convergence check)
  gradient_based: bool

  @property
  def min_perturbation(self) -> bool:
    return self.name in MIN_PERTURBATION_ATTACKS


def parse_attacks(specs, field='eval.attacks') -> list[tuple[str, str, dict]]:
  """[(spec, name, kwargs)] with names checked against the registry."""
  out = []
  for i, spec in enumerate(specs):
    parsed = config_utils.parse_spec(spec, field=f'{field}[{i}]')
    if len(parsed) != 1:
      raise ValueError(f'{field}[{i}]={spec!r}: one attack per entry (no "+")')
    name, kwargs = parsed[0]
    if name not in attacks.ATTACKS:
      raise ValueError(f'{field}[{i}]: unknown attack {name!r}; valid names: '
                       f'{", ".join(attacks.ATTACKS)}')
    for reserved in ('eps', 'norm', 'eot_samples', 'return_success'):
      if reserved in kwargs:
        raise ValueError(f'{field}[{i}]={spec!r}: {reserved!r} comes from eval.epsilons / '
                         'eval.norm / eval.eot_samples, not from the attack spec')
    out.append((config_utils.spec_name(spec), name, kwargs))
  return out


def _attack_norm(name: str, norm: str) -> str:
  supported = attacks.ATTACK_NORMS[name]
  return norm if norm in supported else supported[0]


def validate_eval_config(e) -> None:
  """Checks attack specs, norm, epsilons and counts before any compute.

  Each attack is traced once abstractly on a tiny linear model, so bad hyperparameters
  surface here with the attack module's own message naming the field.
  """
  config_utils.check_choice('eval.norm', e.norm, attacks.NORMS)
  for eps in e.epsilons:
    config_utils.check_positive('eval.epsilons', eps, allow_zero=True)
    if e.norm == 'linf' and eps > 1:
      raise ValueError(f'eval.epsilons: {eps} exceeds 1; epsilons are in [0, 1] pixel units')
  config_utils.check_positive('eval.eot_samples', e.eot_samples, integer=True)
  config_utils.check_positive('eval.num_attack_examples', e.num_attack_examples,
                              allow_zero=True, integer=True)
  parsed = parse_attacks(e.attacks)
  if any(name not in MIN_PERTURBATION_ATTACKS for _, name, _ in parsed) and not e.epsilons:
    raise ValueError('eval.epsilons is empty but eval.attacks has fixed-budget attacks; '
                     'give epsilons, e.g. (0.1, 0.3)')
  for i, (spec, name, kwargs) in enumerate(parse_attacks(e.attacks)):
    norm = e.norm
    if name not in MIN_PERTURBATION_ATTACKS and norm not in attacks.ATTACK_NORMS[name]:
      raise ValueError(f'eval.attacks[{i}]={spec!r} does not support eval.norm={norm!r}; it '
                       f'supports {attacks.ATTACK_NORMS[name]}')
    call = dict(kwargs)
    if name in MIN_PERTURBATION_ATTACKS:
      call['norm'] = _attack_norm(name, norm)
    else:
      call.update(eps=float(e.epsilons[0]), norm=norm)
    check_attack_call(f'eval.attacks[{i}]={spec!r}', name, call)


def check_attack_call(label: str, name: str, kwargs: dict) -> None:
  """Traces attack `name` with `kwargs` abstractly on a tiny linear model, so that bad
  hyperparameters fail before any compute with the attack's own message after `label`."""
  x = jnp.zeros((2, 2, 2, 1))
  y = jnp.zeros((2,), jnp.int32)
  w = jnp.ones((4, 3))
  toy = lambda x, key: x.reshape((x.shape[0], -1)) @ w
  try:
    jax.eval_shape(lambda: attacks.ATTACKS[name](toy, jax.random.key(0), x, y, **kwargs))
  except (TypeError, ValueError) as err:
    raise ValueError(f'{label}: {err}') from None


def _with_surrogate(spec: str) -> str | None:
  """The BPDA version of a spec containing jump(...): ReLU's gradient in the backward pass."""
  parsed = config_utils.parse_spec(spec)
  if not any(n == 'jump' for n, _ in parsed):
    return None
  parts = []
  for name, kwargs in parsed:
    if name == 'jump' and kwargs.get('surrogate') is None:
      kwargs = dict(kwargs, surrogate='relu')
    args = ', '.join(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}'
                     for k, v in kwargs.items())
    parts.append(f'{name}({args})' if args else name)
  return ' + '.join(parts)


def _without_jump(spec: str) -> str:
  """kappa = 0: the same defense with its jumps removed (the JumpReLU gray-box source)."""
  kept = [(n, k) for n, k in config_utils.parse_spec(spec) if n != 'jump']
  if not kept:
    return 'none'
  return ' + '.join(f'{n}(' + ', '.join(f'{a}={v!r}' if isinstance(v, str) else f'{a}={v}'
                                        for a, v in k.items()) + ')' for n, k in kept)


def plan_attacks(spec: str, e) -> list[AttackPlan]:
  """The attack list for one defense, adapted to it when eval.adaptive."""
  hook = retrofit.build_hook(spec)
  stochastic = hook is not None and hook.stochastic
  bpda_spec = _with_surrogate(spec) if e.adaptive else None
  plans, first_gradient = [], True
  for attack_spec, name, kwargs in parse_attacks(e.attacks):
    gradient = name in GRADIENT_ATTACKS
    kw = dict(kwargs)
    if name in MIN_PERTURBATION_ATTACKS:
      kw['norm'] = _attack_norm(name, e.norm)
    # Gradient attacks get EOT; Square keeps one draw per query (as AutoAttack's released
    # code does), since EOT multiplies its many queries; AutoAttack-rand has its own EOT.
    if stochastic and e.adaptive and gradient and _accepts(name, 'eot_samples') and \
        name != 'autoattack_rand':
      k = e.eot_samples
      if gradient and first_gradient and e.single_draw_baseline:
        plans.append(AttackPlan(f'{attack_spec}+1draw', name, kw, spec, 'white-box, 1 draw/step',
                                attack_spec, gradient))
      plans.append(AttackPlan(f'{attack_spec}+eot{k}', name, dict(kw, eot_samples=k), spec,
                              f'white-box EOT-{k}', attack_spec, gradient))
    else:
      plans.append(AttackPlan(attack_spec, name, kw, spec, 'white-box', attack_spec, gradient))
    if gradient and bpda_spec:
      plans.append(AttackPlan(f'{attack_spec}+bpda', name, kw, bpda_spec, 'BPDA (ReLU gradient)',
                              attack_spec, gradient))
    if gradient and first_gradient and e.adaptive and spec != 'none' and \
        name not in MIN_PERTURBATION_ATTACKS:
      source = _without_jump(spec) if bpda_spec else 'none'
      label = 'kappa=0' if bpda_spec else 'none'
      source_hook = retrofit.build_hook(source)
      skw = dict(kw)
      if source_hook is not None and source_hook.stochastic and _accepts(name, 'eot_samples'):
        skw['eot_samples'] = e.eot_samples
      plans.append(AttackPlan(f'{attack_spec}+transfer({label})', name, skw, source,
                              f'transfer from {source}', attack_spec, gradient))
    if gradient:
      first_gradient = False
  return plans


class _Scorer:
  """Scores inputs with a defense's own decision rule on fresh draws."""

  def __init__(self, model, variables, spec, num_draws, batch_size, key, mesh=None):
    hook = retrofit.build_hook(spec)
    self.stochastic = hook is not None and hook.stochastic
    self.logits_fn = retrofit.make_logits_fn(model, variables, hook)
    self.predict = evaluation.make_predict_fn(self.logits_fn, stochastic=self.stochastic,
                                              num_draws=num_draws)
    self.batch_size = batch_size
    self.key = key
    self.mesh = mesh
    self.calls = 0

  def __call__(self, images, labels, batches_adv):
    self.calls += 1
    return evaluation.score_predictions(
        self.predict, images, labels, self.batch_size, jax.random.fold_in(self.key, self.calls),
        stochastic=self.stochastic, x_override=lambda i, b: batches_adv[i], return_correct=True,
        mesh=self.mesh)


class _Crafters:
  """Jitted attack runners, compiled once per (attack, hyperparameters, crafting model).

  Epsilon is a traced argument, so sweeping eval.epsilons never recompiles.
  """

  def __init__(self, model, variables, mesh=None):
    self.model, self.variables, self.cache = model, variables, {}
    self.mesh = mesh

  def shard(self, batch):
    """The batch split over the mesh's devices (unchanged without a mesh)."""
    return batch if self.mesh is None else parallel.shard_batch(batch, self.mesh)

  def get(self, plan: AttackPlan):
    cache_key = (plan.name, plan.craft_spec, tuple(sorted(plan.kwargs.items())))
    if cache_key not in self.cache:
      logits_fn = retrofit.make_logits_fn(self.model, self.variables,
                                          retrofit.build_hook(plan.craft_spec))
      fn = attacks.ATTACKS[plan.name]
      kwargs = dict(plan.kwargs)
      if plan.min_perturbation:
        kwargs['return_success'] = True
        run = lambda x, y, k, eps: fn(logits_fn, k, x, y, **kwargs)
      else:
        run = lambda x, y, k, eps: fn(logits_fn, k, x, y, eps=eps, **kwargs)
      self.cache[cache_key] = jax.jit(run)
    return self.cache[cache_key]

  def craft(self, plan: AttackPlan, images, labels, batch_size, key, eps):
    """Runs one attack over the split in padded batches -> (x_adv per batch, success)."""
    run = self.get(plan)
    outs, successes = [], []
    for i, batch in enumerate(data_lib.eval_batches(images, labels, batch_size)):
      mask = np.asarray(batch['mask'])
      batch = self.shard(batch)
      out = run(batch['image'], batch['label'], jax.random.fold_in(key, i),
                jnp.float32(0.0 if eps is None else eps))
      if plan.min_perturbation:
        out, success = out
        successes.append(parallel.to_numpy(success)[mask])
      outs.append(out)
    return outs, (np.concatenate(successes) if plan.min_perturbation else None)


def _clean_batches(images, labels, batch_size):
  return [b['image'] for b in data_lib.eval_batches(images, labels, batch_size)]


def _slack(accuracy: float, n: int, stochastic: bool) -> float:
  """Tolerance for comparing two accuracies on n examples: MC noise for stochastic models."""
  se = math.sqrt(max(accuracy * (1 - accuracy), 1.0 / n) / n)
  return max(0.01, 2 * se) if stochastic else 0.01


def evaluate_attacks(config, model, variables, images, labels, key,
                     clean_rows, *, mesh=None) -> tuple[list[dict], list[dict]]:
  """Attack rows (per defense, attack, epsilon), worst-case rows and checks.

  Data parallel over `mesh` (default: the `config.parallel` mesh).
  """
  e = config.eval
  if not e.attacks and not e.checks:
    return [], []
  if mesh is None:
    mesh = parallel.mesh_from_config(config)
  parallel.check_divisible(e.batch_size, mesh, 'eval.batch_size')
  variables = parallel.replicate(variables, mesh)
  n = e.num_attack_examples or len(labels)
  images, labels = images[:n], labels[:n]
  n = len(labels)
  attack_root, score_root, check_root = jax.random.split(key, 3)
  rows, checks = [], []
  undefended_rows = None
  for d_index, spec in enumerate(e.defenses):
    defense = config_utils.spec_name(spec)
    scorer = _Scorer(model, variables, spec, e.num_draws, e.batch_size,
                     jax.random.fold_in(score_root, d_index), mesh)
    crafters = _Crafters(model, variables, mesh)
    d_rows, per_example = [], {}
    for a_index, plan in enumerate(plan_attacks(spec, e)):
      eps_list = [None] if plan.min_perturbation else list(e.epsilons)
      for eps_index, eps in enumerate(eps_list):
        t0 = time.time()
        attack_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
            attack_root, d_index), a_index), eps_index)
        adv, success = crafters.craft(plan, images, labels, e.batch_size, attack_key, eps)
        row = scorer(images, labels, adv)
        correct = row.pop('_correct')
        row.pop('calibration_bins', None)
        norm = plan.kwargs.get('norm', e.norm) if plan.min_perturbation else e.norm
        row.update(defense=defense, attack=plan.label, norm=norm, epsilon=eps,
                   threat=plan.threat, seconds=time.time() - t0)
        if scorer.stochastic:
          row['stochastic'] = True
        if 'eot_samples' in plan.kwargs:
          row['eot_samples'] = plan.kwargs['eot_samples']
        if plan.min_perturbation:
          x_adv = np.concatenate([parallel.to_numpy(a) for a in adv])[:n]
          x = data_lib.to_float(np.asarray(images))
          norms = np.asarray(attacks.perturbation_norms(x, x_adv, norm))
          rel = np.asarray(attacks.relative_perturbation_norms(x, x_adv, norm))
          ok = success if success is not None else ~correct
          row['success_rate'] = float(np.mean(ok))
          row['median_perturbation'] = float(np.median(norms[ok])) if ok.any() else None
          row['median_relative_perturbation'] = float(np.median(rel[ok])) if ok.any() else None
        else:
          per_example[(plan.label, eps)] = correct
        d_rows.append(row)
        _log(f'{defense} | {plan.label} | eps={eps}: accuracy {row["accuracy"]:.3f} '
             f'({row["seconds"]:.1f} s)')
    rows += d_rows
    worst = _worst_case_rows(defense, e, per_example, n)
    rows += worst
    if defense == 'none':
      undefended_rows = d_rows
    if e.checks:
      checks += run_checks(config, spec, images, labels, d_rows, per_example, scorer, crafters,
                           jax.random.fold_in(check_root, d_index), undefended_rows)
  return rows, checks


def _worst_case_rows(defense, e, per_example, n) -> list[dict]:
  rows = []
  for eps in e.epsilons:
    labels = [label for (label, eps2) in per_example if eps2 == eps]
    if len(labels) < 2:
      continue
    robust = np.logical_and.reduce([per_example[(label, eps)] for label in labels])
    acc = float(np.mean(robust))
    rows.append({'defense': defense, 'attack': 'worst_case', 'norm': e.norm, 'epsilon': eps,
                 'accuracy': acc, 'ci95': evaluation.wilson_interval(acc * n, n), 'n': n,
                 'worst_case': True, 'attacks': labels})
  return rows


def _log(message):
  # Progress for people watching a long evaluation; absl's INFO is silenced for orbax.
  print(f'[eval] {message}', file=sys.stderr, flush=True)


def _check(defense, name, status, detail):
  return {'defense': defense, 'name': name, 'status': status, 'detail': detail}


def run_checks(config, spec, images, labels, d_rows, per_example, scorer, crafters, key,
               undefended_rows) -> list[dict]:
  """The sanity checks for one defense; see the module docstring."""
  e = config.eval
  defense = config_utils.spec_name(spec)
  n = len(labels)
  stochastic = scorer.stochastic
  out = []
  keys = iter(jax.random.split(key, 8))
  eps_rows = [r for r in d_rows if r['epsilon'] is not None]

  # 1. Accuracy does not rise with epsilon, per attack.
  if len(e.epsilons) > 1 and eps_rows:
    bad = []
    for label in dict.fromkeys(r['attack'] for r in eps_rows):
      series = sorted((r['epsilon'], r['accuracy']) for r in eps_rows if r['attack'] == label)
      for (e0, a0), (e1, a1) in zip(series, series[1:]):
        if a1 > a0 + _slack(a0, n, stochastic):
          bad.append(f'{label}: {a0:.3f} at {e0:.4g} -> {a1:.3f} at {e1:.4g}')
    out.append(_check(defense, 'accuracy_monotone_in_eps', 'fail' if bad else 'pass',
                      '; '.join(bad) if bad else 'non-increasing for every attack'))

  plans = plan_attacks(spec, e)
  main = next((p for p in plans if p.name in ITERATIVE_ATTACKS and p.craft_spec == spec), None)
  clean_batches = _clean_batches(images, labels, e.batch_size)

  # 2. Accuracy near chance at a large epsilon (L-inf 0.5).
  if main is not None and e.norm in LARGE_EPS:
    adv, _ = crafters.craft(main, images, labels, e.batch_size, next(keys), LARGE_EPS[e.norm])
    acc = scorer(images, labels, adv)['accuracy']
    chance = 1.0 / max(int(jnp.max(labels)) + 1, 2)
    status = 'pass' if acc <= chance + 0.05 else 'fail'
    out.append(_check(defense, 'large_eps_collapse', status,
                      f'{main.label} at {e.norm} eps={LARGE_EPS[e.norm]}: accuracy {acc:.3f} '
                      f'(chance {chance:.3f})'))

  # 3. Iterative beats single-step.
  fgsm_rows = [r for r in eps_rows if r['attack'].startswith('fgsm') and 'transfer' not in
               r['attack']]
  iter_rows = [r for r in eps_rows if r['attack'].split('(')[0].split('+')[0] in ITERATIVE_ATTACKS
               and 'transfer' not in r['attack']]
  if fgsm_rows and iter_rows:
    bad = []
    for eps in e.epsilons:
      f = min((r['accuracy'] for r in fgsm_rows if r['epsilon'] == eps), default=None)
      it = min((r['accuracy'] for r in iter_rows if r['epsilon'] == eps), default=None)
      if f is not None and it is not None and it > f + _slack(f, n, stochastic):
        bad.append(f'eps={eps:.4g}: iterative {it:.3f} > single-step {f:.3f}')
    out.append(_check(defense, 'iterative_beats_single_step', 'fail' if bad else 'pass',
                      '; '.join(bad) if bad else 'the best iterative attack is at least as '
                      'strong as FGSM at every epsilon'))

  # 4. White-box beats transfer, per example.
  transfer = [k for k in per_example if 'transfer' in k[0]]
  if transfer:
    details, status = [], 'pass'
    for label, eps in transfer:
      white = [per_example[(l, eps)] for (l, e2) in per_example
               if e2 == eps and 'transfer' not in l]
      if not white:
        continue
      white_robust = np.logical_and.reduce(white)
      only_transfer = float(np.mean(white_robust & ~per_example[(label, eps)]))
      if only_transfer > _slack(0.0, n, stochastic):
        status = 'warn'
      details.append(f'eps={eps:.4g}: {only_transfer:.1%} of examples fall only to {label}')
    out.append(_check(defense, 'white_box_beats_transfer', status, '; '.join(details)))

  # 5. Square (gradient-free) does not beat the gradient attacks.
  square_rows = [r for r in eps_rows if r['attack'].startswith('square')]
  grad_rows = [r for r in eps_rows if r['attack'].split('(')[0].split('+')[0] in GRADIENT_ATTACKS
               and 'transfer' not in r['attack']]
  if square_rows and grad_rows:
    bad = []
    for eps in e.epsilons:
      s = min((r['accuracy'] for r in square_rows if r['epsilon'] == eps), default=None)
      g = min((r['accuracy'] for r in grad_rows if r['epsilon'] == eps), default=None)
      if s is not None and g is not None and s < g - max(0.002, _slack(g, n, stochastic) - 0.01):
        bad.append(f'eps={eps:.4g}: Square {s:.3f} < gradient {g:.3f}')
    out.append(_check(defense, 'square_not_better_than_gradient', 'warn' if bad else 'pass',
                      '; '.join(bad) + ' (gradients may be masked: try BPDA or more EOT)' if bad
                      else 'gradient attacks are at least as strong as Square'))

  # 6. Convergence: doubling steps, restarts and EOT samples changes little.
  if main is not None and e.epsilons:
    # The most informative epsilon: where the attack leaves accuracy closest to 50%.
    eps = min(e.epsilons, key=lambda v: abs(next(
        r['accuracy'] for r in d_rows if r['attack'] == main.label and r['epsilon'] == v) - 0.5))
    doubled = dict(main.kwargs)
    for field, default in (('steps', 10), ('restarts', 1), ('eot_samples', 1)):
      if field in doubled or (field == 'steps' and _accepts(main.name, 'steps')):
        doubled[field] = 2 * doubled.get(field, inspect.signature(
            attacks.ATTACKS[main.name]).parameters[field].default)
    twice = dataclasses.replace(main, kwargs=doubled, label=main.label + ' x2')
    adv, _ = crafters.craft(twice, images, labels, e.batch_size, next(keys), eps)
    acc2 = scorer(images, labels, adv)['accuracy']
    acc1 = next(r['accuracy'] for r in d_rows if r['attack'] == main.label and
                r['epsilon'] == eps)
    ok = abs(acc2 - acc1) <= _slack(acc1, n, stochastic)
    changed = ', '.join(f'{k}={v}' for k, v in doubled.items() if main.kwargs.get(k) != v)
    out.append(_check(defense, 'convergence', 'pass' if ok else 'warn',
                      f'{main.label} at eps={eps:.4g}: {acc1:.3f}; with {changed}: {acc2:.3f}'))

  # 7. Gradient health: share of zero or NaN input gradients (margin loss, one draw).
  logits_fn = scorer.logits_fn
  zero, nan, total = 0, 0, 0
  g_key = next(keys)

  @jax.jit
  def input_grads(x, y, k):
    return jax.grad(lambda x: jnp.sum(attacks.margin(logits_fn(x, k), y)))(x)

  for i, batch in enumerate(data_lib.eval_batches(images, labels, e.batch_size)):
    mask = np.asarray(batch['mask'])
    batch = crafters.shard(batch)
    g = parallel.to_numpy(input_grads(batch['image'], batch['label'],
                                      jax.random.fold_in(g_key, i)))
    g = g[mask].reshape(int(np.sum(mask)), -1)
    nan += int(np.sum(~np.all(np.isfinite(g), axis=1)))
    zero += int(np.sum(np.all(g == 0, axis=1)))
    total += len(g)
  status = 'fail' if nan else ('warn' if zero / total > 0.01 else 'pass')
  out.append(_check(defense, 'gradient_health', status,
                    f'{zero / total:.1%} of examples have an all-zero input gradient, '
                    f'{nan / total:.1%} a NaN or infinite one'
                    + (' (use BPDA or gradient-free attacks)' if zero / total > 0.01 else '')))

  # 8. Randomness detected iff the defense is declared stochastic (AutoAttack: 5 passes).
  x0 = crafters.shard(clean_batches[0])
  outs = [parallel.to_numpy(jax.jit(logits_fn)(x0, k)) for k in jax.random.split(next(keys), 5)]
  varies = any(np.max(np.abs(o - outs[0])) > 1e-4 for o in outs[1:])
  out.append(_check(defense, 'randomness_detected', 'pass' if varies == stochastic else 'fail',
                    f'logits {"vary" if varies else "do not vary"} over 5 passes; the defense is '
                    f'declared {"stochastic" if stochastic else "deterministic"}'))

  # 9. Fixed randomness: with its draws frozen, the model should fall like the undefended one.
  if stochastic and main is not None and e.epsilons:
    eps = max(e.epsilons)
    frozen_key = next(keys)
    frozen_fn = attacks.fixed_randomness(logits_fn, frozen_key)
    fn = attacks.ATTACKS[main.name]
    kwargs = {k: v for k, v in main.kwargs.items() if k != 'eot_samples'}
    run = jax.jit(lambda x, y, k: fn(frozen_fn, k, x, y, eps=eps, **kwargs))
    correct, attack_key = [], next(keys)
    for i, batch in enumerate(data_lib.eval_batches(images, labels, e.batch_size)):
      mask = np.asarray(batch['mask'])
      batch = crafters.shard(batch)
      x_adv = run(batch['image'], batch['label'], jax.random.fold_in(attack_key, i))
      pred = jnp.argmax(frozen_fn(x_adv, None), -1)
      correct.append(parallel.to_numpy((pred == batch['label']) & batch['mask'])[mask])
    frozen_acc = float(np.mean(np.concatenate(correct)))
    base = None
    if undefended_rows:
      base = min((r['accuracy'] for r in undefended_rows
                  if r['epsilon'] == eps and r['attack'].startswith(main.base)), default=None)
    if base is None:
      status, ref = 'warn', 'no undefended baseline in eval.defenses to compare with'
    else:
      status = 'pass' if frozen_acc <= base + 0.1 else 'warn'
      ref = f'undefended model under {main.base}: {base:.3f}'
    out.append(_check(defense, 'fixed_randomness', status,
                      f'{main.name} at eps={eps:.4g} with the draws frozen: accuracy '
                      f'{frozen_acc:.3f}; {ref}'))
  return out
