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
  - SAP: the first iterative gradient attack also runs with BPDA (`+bpda`: SAP's forward pass, the
    identity as the mask's backward pass, with EOT), as Dhillon & Carlini's erratum attack;
  - every defended model: transfer from the undefended model for the first gradient attack of
    each kind (fixed-budget, minimum-perturbation), or for every gradient attack with
    `eval.transfer_attacks='all'` (the JumpReLU paper's gray-box tables).
Minimum-perturbation rows also carry the JumpReLU paper's noise figures (`paper_relative_noise`,
`paper_absolute_noise`: the mean over ALL attacked examples of ||delta|| / ||x|| and ||delta||,
measured in the model's normalised input space, as the authors' `distance` does).
Adversarial examples are always scored with the defense's own decision rule on fresh draws
(Monte-Carlo average of `eval.num_draws` softmaxes for stochastic defenses); attack keys
and scoring keys come from independent streams.

Checks (Carlini et al. 2019; AutoAttack's flags), each pass / warn / fail with a detail:
  accuracy_monotone_in_eps, large_eps_collapse, iterative_beats_single_step,
  white_box_beats_transfer, square_not_better_than_gradient, convergence,
  gradient_health, randomness_detected, fixed_randomness.

Attacks, scoring and checks (advdef.evaluators.checks) run data parallel: every batch is
split over the devices of the `config.parallel` mesh (advdef.parallel) and the variables are
replicated.

Each attack row (with its per-example correctness) and each defense's checks are saved as
they finish, in <workdir>/eval_results (advdef.evaluators.results); a rerun skips them and
writes the rows of an uninterrupted run. On a terminal a status line shows the row under
way, its batches, the rows done of the suite (each defense's checks count as one) and the
time left (advdef.progress); elsewhere each finished row logs one line.

  sections = attack_suite.evaluate(ctx)   # {'rows': [...], 'checks': [...]}
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advdef import attacks
from advdef import config_utils
from advdef import data as data_lib
from advdef import defenses
from advdef import evaluation
from advdef import parallel
from advdef import retrofit
from advdef import validate
from advdef.evaluators import base
from advdef.evaluators import checks as checks_lib
from advdef.evaluators import results

RESERVED_ATTACK_ARGS = ('eps', 'norm', 'eot_samples', 'return_success')


@dataclasses.dataclass(frozen=True)
class AttackPlan:
  """One attack to run against one defense."""
  label: str            # as shown in the report, e.g. 'pgd(steps=20)+eot8'
  name: str             # attacks registry name
  kwargs: dict          # static hyperparameters (eps is added per epsilon)
  craft: retrofit.DefenseSpec  # the defense whose logits_fn the attack differentiates
  threat: str           # 'white-box', 'white-box EOT-k', 'BPDA', 'transfer from ...'
  base: str             # the attack spec it derives from (for the convergence check)
  gradient_based: bool

  @property
  def min_perturbation(self) -> bool:
    return self.name in base.MIN_PERTURBATION_ATTACKS


def parse_attacks(specs, field='eval.attacks') -> tuple[base.AttackSpec, ...]:
  """Attack spec strings -> AttackSpecs, names checked against the registry."""
  out = []
  for i, spec in enumerate(specs):
    parsed = config_utils.parse_spec(spec, field=f'{field}[{i}]')
    if len(parsed) != 1:
      raise ValueError(f'{field}[{i}]={spec!r}: one attack per entry (no "+")')
    name, kwargs = parsed[0]
    if name not in attacks.ATTACKS:
      raise ValueError(f'{field}[{i}]: unknown attack {name!r}; valid names: '
                       f'{", ".join(attacks.ATTACKS)}')
    for reserved in RESERVED_ATTACK_ARGS:
      # A minimum-perturbation attack's norm is the one it minimises, not a budget's, so it
      # may be chosen per attack (DeepFool-L2 beside DeepFool-L-inf in one suite).
      if reserved == 'norm' and name in base.MIN_PERTURBATION_ATTACKS:
        if 'norm' in kwargs:
          validate.check_choice(f'{field}[{i}]={spec!r}: norm', kwargs['norm'],
                                attacks.ATTACK_NORMS[name])
        continue
      if reserved in kwargs:
        raise ValueError(f'{field}[{i}]={spec!r}: {reserved!r} comes from eval.epsilons / '
                         'eval.norm / eval.eot_samples, not from the attack spec')
    out.append(base.AttackSpec(config_utils.spec_name(spec), name, kwargs))
  return tuple(out)


def _attack_norm(name: str, norm: str) -> str:
  supported = attacks.ATTACK_NORMS[name]
  return norm if norm in supported else supported[0]


def parse_eval_attacks(e) -> tuple[base.AttackSpec, ...]:
  """Checks eval.attacks, norm, epsilons and counts before any compute; returns the specs.

  Each attack is traced once abstractly on a tiny linear model, so bad hyperparameters
  surface here with the attack module's own message naming the field.
  """
  validate.check_choice('eval.norm', e.norm, attacks.NORMS)
  for eps in e.epsilons:
    validate.check_positive('eval.epsilons', eps, allow_zero=True)
    if e.norm == 'linf' and eps > 1:
      raise ValueError(f'eval.epsilons: {eps} exceeds 1; epsilons are in [0, 1] pixel units')
  validate.check_positive('eval.eot_samples', e.eot_samples, integer=True)
  validate.check_positive('eval.num_attack_examples', e.num_attack_examples,
                          allow_zero=True, integer=True)
  parsed = parse_attacks(e.attacks)
  if any(a.name not in base.MIN_PERTURBATION_ATTACKS for a in parsed) and not e.epsilons:
    raise ValueError('eval.epsilons is empty but eval.attacks has fixed-budget attacks; '
                     'give epsilons, e.g. (0.1, 0.3)')
  for i, a in enumerate(parsed):
    norm = e.norm
    if a.name not in base.MIN_PERTURBATION_ATTACKS and norm not in attacks.ATTACK_NORMS[a.name]:
      raise ValueError(f'eval.attacks[{i}]={a.label!r} does not support eval.norm={norm!r}; it '
                       f'supports {attacks.ATTACK_NORMS[a.name]}')
    call = dict(a.kwargs)
    if a.name in base.MIN_PERTURBATION_ATTACKS:
      call['norm'] = a.kwargs.get('norm') or _attack_norm(a.name, norm)
    else:
      call.update(eps=float(e.epsilons[0]), norm=norm)
    check_attack_call(f'eval.attacks[{i}]={a.label!r}', a.name, call)
  return parsed


def check_attack_call(label: str, name: str, kwargs: dict) -> None:
  """Traces attack `name` with `kwargs` abstractly on a tiny linear model, so that bad
  hyperparameters fail before any compute with the attack's own message after `label`."""
  x = jnp.zeros((2, 2, 2, 1))
  y = jnp.zeros((2,), jnp.int32)
  # Ten classes, so that APGD-T's (and AutoAttack's) default 9 target classes fit.
  w = jnp.ones((4, 10))
  toy = lambda x, key: x.reshape((x.shape[0], -1)) @ w
  try:
    jax.eval_shape(lambda: attacks.ATTACKS[name](toy, jax.random.key(0), x, y, **kwargs))
  except (TypeError, ValueError) as err:
    raise ValueError(f'{label}: {err}') from None


# eval.transfer_attacks: which gradient attacks also get a transfer row from the undefended
# model.
TRANSFER_ATTACKS = ('first_of_kind', 'all')


def _has_jump(spec: str) -> bool:
  return any(n == 'jump' for n, _ in config_utils.parse_spec(spec))


def _with_surrogate(spec: str) -> str | None:
  """The BPDA version of a spec: ReLU's gradient through jump(...) and the identity through
  sap(...)'s mask in the backward pass (the forward pass unchanged); None when the spec has
  neither, or already uses those surrogates."""
  parsed = config_utils.parse_spec(spec)
  parts, changed = [], False
  for name, kwargs in parsed:
    if name == 'jump' and kwargs.get('surrogate') is None:
      kwargs, changed = dict(kwargs, surrogate='relu'), True
    elif name == 'sap' and kwargs.get('gradient', 'constant') != defenses.SAP_BPDA_GRADIENT:
      kwargs, changed = dict(kwargs, gradient=defenses.SAP_BPDA_GRADIENT), True
    args = ', '.join(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}'
                     for k, v in kwargs.items())
    parts.append(f'{name}({args})' if args else name)
  return ' + '.join(parts) if changed else None


def _without_jump(spec: str) -> str:
  """kappa = 0: the same defense with its jumps removed (the JumpReLU gray-box source)."""
  kept = [(n, k) for n, k in config_utils.parse_spec(spec) if n != 'jump']
  if not kept:
    return 'none'
  return ' + '.join(f'{n}(' + ', '.join(f'{a}={v!r}' if isinstance(v, str) else f'{a}={v}'
                                        for a, v in k.items()) + ')' for n, k in kept)


def plan_attacks(defense: retrofit.DefenseSpec, attack_specs: tuple[base.AttackSpec, ...],
                 e) -> list[AttackPlan]:
  """The attack list for one defense, adapted to it when eval.adaptive."""
  spec = defense.text
  bpda_text = _with_surrogate(spec) if e.adaptive else None
  bpda = retrofit.parse_defense(bpda_text) if bpda_text else None
  jump = _has_jump(spec)
  # JumpReLU: BPDA for every gradient attack (cheap, and its exact gradient is zero almost
  # everywhere near the jump); SAP: for the first iterative fixed-budget one only, with EOT
  # (it doubles SAP's cost, and SAP's own gradient is already informative).
  sap_to_bpda = any(n == 'sap' and k.get('gradient', 'constant') != defenses.SAP_BPDA_GRADIENT
                    for n, k in config_utils.parse_spec(spec))
  bpda_threat = 'BPDA (' + ' and '.join((['ReLU gradient'] if jump else [])
                                        + (['identity through the SAP mask'] if sap_to_bpda
                                           else [])) + ')'
  plans, first_gradient, kinds_seen = [], True, set()
  for a in attack_specs:
    name = a.name
    gradient = name in base.GRADIENT_ATTACKS
    # Transfer goes with the first gradient attack of each kind, fixed-budget and minimum-
    # perturbation, so that listing C&W first does not drop PGD's transfer row; SAP's BPDA
    # with the first iterative fixed-budget one.
    kind = 'min' if name in base.MIN_PERTURBATION_ATTACKS else 'budget'
    first_of_kind = gradient and (kind not in kinds_seen or e.transfer_attacks == 'all')
    iterative = gradient and kind == 'budget' and name != 'fgsm'
    first_iterative = iterative and 'iterative' not in kinds_seen
    kw = dict(a.kwargs)
    if name in base.MIN_PERTURBATION_ATTACKS:
      kw['norm'] = kw.get('norm') or _attack_norm(name, e.norm)
    # Gradient attacks get EOT; Square keeps one draw per query (as AutoAttack's released
    # code does), since EOT multiplies its many queries; AutoAttack-rand has its own EOT.
    if defense.stochastic and e.adaptive and gradient and base.accepts(name, 'eot_samples') and \
        name != 'autoattack_rand':
      k = e.eot_samples
      if gradient and first_gradient and e.single_draw_baseline:
        plans.append(AttackPlan(f'{a.label}+1draw', name, kw, defense, 'white-box, 1 draw/step',
                                a.label, gradient))
      plans.append(AttackPlan(f'{a.label}+eot{k}', name, dict(kw, eot_samples=k), defense,
                              f'white-box EOT-{k}', a.label, gradient))
    else:
      plans.append(AttackPlan(a.label, name, kw, defense, 'white-box', a.label, gradient))
    if gradient and bpda and (jump or first_iterative):
      bkw = dict(kw)
      if bpda.stochastic and base.accepts(name, 'eot_samples') and name != 'autoattack_rand':
        bkw['eot_samples'] = e.eot_samples
      plans.append(AttackPlan(f'{a.label}+bpda', name, bkw, bpda, bpda_threat, a.label,
                              gradient))
    if first_of_kind and e.adaptive and spec != 'none':
      # The gray-box / transfer threat: crafted on the model without the defense, scored on
      # the defense (minimum-perturbation attacks too: their norms are the crafted ones).
      source = retrofit.parse_defense(_without_jump(spec) if jump else 'none')
      label = 'kappa=0' if jump else 'none'
      skw = dict(kw)
      if source.stochastic and base.accepts(name, 'eot_samples'):
        skw['eot_samples'] = e.eot_samples
      plans.append(AttackPlan(f'{a.label}+transfer({label})', name, skw, source,
                              f'transfer from {source.text}', a.label, gradient))
    if gradient:
      first_gradient = False
      kinds_seen.add(kind)
      if iterative:
        kinds_seen.add('iterative')
  return plans


class Scorer:
  """Scores inputs with a defense's own decision rule on fresh draws."""

  def __init__(self, ctx: base.Context, variables, defense: retrofit.DefenseSpec, batch_size,
               key):
    self.stochastic = defense.stochastic
    self.predict = base.predict_program(ctx, variables, defense)
    self.batch_size = batch_size
    self.key = key
    self.mesh = ctx.mesh
    self.ensemble_sizes = tuple(ctx.config.eval.ensemble_sizes)
    self.calls = 0

  def next_key(self) -> jax.Array:
    """The key the next call will score with: fold_in(key, calls + 1)."""
    return jax.random.fold_in(self.key, self.calls + 1)

  def skip(self, calls: int = 1) -> None:
    """Advances the keys as if `calls` calls had run (their results were reused), so that
    later calls score with the keys of an uninterrupted run."""
    self.calls += calls

  def __call__(self, images, labels, batches_adv, on_batch=None):
    """Row fields with '_correct': bool[n]. on_batch(done, total): see score_predictions."""
    key = self.next_key()
    self.calls += 1
    return evaluation.score_predictions(
        self.predict, images, labels, self.batch_size, key,
        stochastic=self.stochastic, x_override=lambda i, b: batches_adv[i], return_correct=True,
        mesh=self.mesh, on_batch=on_batch, ensemble_sizes=self.ensemble_sizes)


class Crafters:
  """Jitted attack runners, compiled once per (attack, hyperparameters, crafting model).

  One instance serves every defense of the suite, so an attack crafted on the same model
  (e.g. transfer from the undefended model) compiles once. Epsilon and the variables are
  traced arguments: sweeping eval.epsilons never recompiles, and the persistent compilation
  cache serves equal programs across runs. batch_size: the attack batch (see
  base.eval_batch_size).
  """

  def __init__(self, model, variables, batch_size, mesh=None):
    self.model, self.variables, self.cache = model, variables, {}
    self.batch_size = batch_size
    self.mesh = mesh

  def shard(self, batch):
    """The batch split over the mesh's devices (unchanged without a mesh)."""
    return batch if self.mesh is None else parallel.shard_batch(batch, self.mesh)

  def compile(self, defense: retrofit.DefenseSpec, fn, name: str):
    """fn(logits_fn, *args) on `defense`, jitted with the variables as an argument."""
    return base.jit_with_variables(self.model, self.variables, defense.hook, fn,
                                   f'{name}_on_{defense.text}')

  def get(self, plan: AttackPlan):
    cache_key = (plan.name, plan.craft.text, tuple(sorted(plan.kwargs.items())))
    if cache_key not in self.cache:
      fn = attacks.ATTACKS[plan.name]
      kwargs = dict(plan.kwargs)
      if plan.min_perturbation:
        kwargs['return_success'] = True
        run = lambda logits_fn, x, y, k, eps: fn(logits_fn, k, x, y, **kwargs)
      else:
        run = lambda logits_fn, x, y, k, eps: fn(logits_fn, k, x, y, eps=eps, **kwargs)
      self.cache[cache_key] = self.compile(plan.craft, run, plan.name)
    return self.cache[cache_key]

  def craft(self, plan: AttackPlan, images, labels, key, eps, on_batch=None):
    """Runs one attack over the split in padded batches -> (x_adv per batch, success).

    on_batch(done, total) is called as batches finish (evaluation.BatchTicker).
    """
    run = self.get(plan)
    outs, successes = [], []
    tick = evaluation.BatchTicker(on_batch, evaluation.num_batches(len(labels), self.batch_size))
    for i, batch in enumerate(data_lib.eval_batches(images, labels, self.batch_size)):
      mask = np.asarray(batch['mask'])
      batch = self.shard(batch)
      out = run(batch['image'], batch['label'], jax.random.fold_in(key, i),
                jnp.float32(0.0 if eps is None else eps))
      if plan.min_perturbation:
        out, success = out
        successes.append(parallel.to_numpy(success)[mask])
      outs.append(out)
      tick(out)
    tick.finish()
    return outs, (np.concatenate(successes) if plan.min_perturbation else None)


def evaluate(ctx: base.Context) -> dict[str, Any]:
  """Attack rows (per defense, attack, epsilon), worst-case rows and checks.

  Each attack row (with its per-example correctness) and each defense's checks are stored as
  they finish (advdef.evaluators.results); a rerun reuses them and advances the scorer's keys
  as if it had recomputed them, so its report equals an uninterrupted run's.
  """
  e = ctx.config.eval
  if not e.attacks and not e.checks:
    return {'rows': [], 'checks': []}
  parallel.check_divisible(e.batch_size, ctx.mesh, 'eval.batch_size')
  variables = parallel.replicate(ctx.variables, ctx.mesh)
  n = e.num_attack_examples or len(ctx.labels)
  images, labels = ctx.images[:n], ctx.labels[:n]
  n = len(labels)
  attack_root, score_root, check_root = jax.random.split(ctx.key('attack_suite'), 3)
  batch_size = base.eval_batch_size(ctx)
  crafters = Crafters(ctx.model, variables, batch_size, ctx.mesh)
  noise_space = _paper_noise_space(ctx.model)
  store = results.open_store(ctx)
  all_plans = [plan_attacks(defense, ctx.plan.attacks, e) for defense in ctx.plan.defenses]
  # Progress units: every attack row, and each defense's checks as one.
  total = sum(1 if p.min_perturbation else len(e.epsilons) for plans in all_plans for p in plans)
  total += len(all_plans) if e.checks else 0
  done = 0
  rows, checks = [], []
  undefended_rows = None
  with base.progress('attack_suite') as bar:
    for d_index, (defense, plans) in enumerate(zip(ctx.plan.defenses, all_plans)):
      scorer = Scorer(ctx, variables, defense, batch_size, jax.random.fold_in(score_root, d_index))
      d_rows, per_example = [], {}
      for a_index, plan in enumerate(plans):
        eps_list = [None] if plan.min_perturbation else list(e.epsilons)
        for eps_index, eps in enumerate(eps_list):
          label = f'{defense.label} | {plan.label} | eps={eps}'
          attack_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
              attack_root, d_index), a_index), eps_index)
          index = (d_index, a_index, eps_index)
          entry_key = {'defense': defense.text, 'attack': plan.label, 'name': plan.name,
                       'kwargs': plan.kwargs, 'craft': plan.craft.text, 'epsilon': eps}
          prng = {'attack': attack_key, 'score': scorer.next_key()}
          entry = store.get('attack_suite', index, entry_key, prng)
          reused = entry is not None
          if reused:
            scorer.skip()
            bar.skip()
          else:
            row, arrays = _attack_row(e, defense, plan, eps, images, labels, attack_key, scorer,
                                      crafters, lambda phase, start: base.batch_reporter(
                                          bar, done, total, label, phase, start, 0.5),
                                      noise_space)
            entry = store.put('attack_suite', index, entry_key, prng, row, arrays)
          row, correct = entry.value, entry.arrays['correct']
          if not plan.min_perturbation:
            per_example[(plan.label, eps)] = correct
          d_rows.append(row)
          done += 1
          base.log(f'{label}: accuracy {row["accuracy"]:.3f} ({base.row_seconds(row, reused)}), '
                   f'{bar.summary(done, total)}', bar)
      rows += d_rows
      rows += _worst_case_rows(defense.label, e, per_example, n)
      if defense.label == 'none':
        undefended_rows = d_rows
      if e.checks:
        check_key = jax.random.fold_in(check_root, d_index)
        entry_key, prng = {'defense': defense.text}, {'checks': check_key,
                                                      'score': scorer.next_key()}
        entry = store.get('checks', (d_index,), entry_key, prng)
        if entry is not None:
          scorer.skip(entry.value['scorer_calls'])
          bar.skip()
        else:
          calls = scorer.calls
          # Checks have several phases of unknown relative cost: no fractional progress.
          report = lambda phase: base.batch_reporter(bar, done, total, f'{defense.label} checks',
                                                     phase, share=0.0)
          d_checks = checks_lib.run_checks(e, defense, plans, images, labels, d_rows,
                                           per_example, scorer, crafters, check_key,
                                           undefended_rows, report=report)
          entry = store.put('checks', (d_index,), entry_key, prng,
                            {'checks': d_checks, 'scorer_calls': scorer.calls - calls})
        checks += entry.value['checks']
        done += 1
        bar.update(done, total)
  return {'rows': rows, 'checks': checks}


def _paper_noise_space(model) -> tuple[np.ndarray, np.ndarray, str]:
  """(mean, std, description) of the input space the JumpReLU paper measures noise in: the
  model's own normalisation when it is by data-set statistics, else [0, 1] pixels."""
  if getattr(model, 'normalize', None) == 'dataset':
    return (np.asarray(model.mean, np.float32), np.asarray(model.std, np.float32),
            'normalised by the data set mean/std')
  return np.zeros(1, np.float32), np.ones(1, np.float32), '[0, 1] pixels'


def paper_noise(x, x_adv, norm: str, space) -> dict[str, Any]:
  """The JumpReLU paper's 'Rel. Noise' and 'Abs. Noise' of a minimum-perturbation attack.

  The mean over ALL examples (fooled or not, 0 for an unchanged one) of ||delta|| / ||x|| and
  of ||delta||, with x and delta in the normalised space `space` = (mean, std, text) per
  channel; L-inf is max|.|, L2 the Euclidean norm (the authors' advfuns.distance). advdef's
  own figure, `median_perturbation`, is the median over fooled examples in [0, 1] pixels.

  Args:
    x, x_adv: float32[B, H, W, C] in [0, 1].
  """
  mean, std, text = space
  x_n = (np.asarray(x, np.float32) - mean) / std
  delta_n = (np.asarray(x_adv, np.float32) - np.asarray(x, np.float32)) / std
  absolute = np.asarray(attacks.perturbation_norms(np.zeros_like(delta_n), delta_n, norm))
  size = np.asarray(attacks.perturbation_norms(np.zeros_like(x_n), x_n, norm))
  return {'paper_relative_noise': float(np.mean(absolute / size)),
          'paper_absolute_noise': float(np.mean(absolute)), 'paper_noise_space': text}


def _attack_row(e, defense, plan, eps, images, labels, attack_key, scorer, crafters, report,
                noise_space) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """One attack row and its per-example arrays: 'correct' bool[n] and, for minimum-
  perturbation attacks, 'perturbation_norm' float32[n]; report(phase, start) gives the
  on_batch callback of the crafting (first half of the row) and scoring (second half)."""
  n = len(labels)
  t0 = time.time()
  adv, success = crafters.craft(plan, images, labels, attack_key, eps,
                                on_batch=report('attack', 0.0))
  row = scorer(images, labels, adv, on_batch=report('scoring', 0.5))
  correct = row.pop('_correct')
  row.pop('calibration_bins', None)
  norm = plan.kwargs.get('norm', e.norm) if plan.min_perturbation else e.norm
  row.update(defense=defense.label, attack=plan.label, norm=norm, epsilon=eps,
             threat=plan.threat, seconds=time.time() - t0)
  if scorer.stochastic:
    row['stochastic'] = True
  if 'eot_samples' in plan.kwargs:
    row['eot_samples'] = plan.kwargs['eot_samples']
  arrays = {'correct': correct}
  if plan.min_perturbation:
    fields, arrays['perturbation_norm'] = _perturbation_fields(adv, success, correct, images,
                                                               norm, n, e.tolerances,
                                                               noise_space)
    row.update(fields)
  return row, arrays


def _perturbation_fields(adv, success, correct, images, norm, n, tolerances, noise_space
                         ) -> tuple[dict[str, Any], np.ndarray]:
  """A minimum-perturbation row's fields and per-example norms float32[n].

  Judged like every row, by the defense's own decision rule on fresh draws: an example is
  broken when the scorer misclassifies its adversarial example (`correct` False), at the
  distortion ||x_adv - x|| in `norm` ([0, 1] pixels; 0 where the attack returned x because
  the clean image is already misclassified). At tolerance t the robust accuracy counts an
  example as broken only if it is broken at distortion <= t ('tolerance_curve', RSE's
  metric). `attack_success_rate` is what the attack itself claimed (on its own draws, for a
  stochastic defense): its gap to `success_rate` is how much judging on the attack's own
  noise would overstate the attack.
  """
  x_adv = np.concatenate([parallel.to_numpy(a) for a in adv])[:n]
  x = data_lib.to_float(np.asarray(images))
  norms = np.asarray(attacks.perturbation_norms(x, x_adv, norm), np.float32)
  rel = np.asarray(attacks.relative_perturbation_norms(x, x_adv, norm))
  broken = ~np.asarray(correct, bool)
  fields = {'success_rate': float(np.mean(broken)),
            'median_perturbation': float(np.median(norms[broken])) if broken.any() else None,
            'median_relative_perturbation':
                float(np.median(rel[broken])) if broken.any() else None}
  fields.update(paper_noise(x, x_adv, norm, noise_space))
  if success is not None:
    fields['attack_success_rate'] = float(np.mean(success))
  if len(tolerances):
    curve = []
    for t in tolerances:
      robust = float(np.mean(~(broken & (norms <= t))))
      curve.append({'tolerance': float(t), 'accuracy': robust,
                    'ci95': evaluation.wilson_interval(robust * n, n)})
    fields['tolerance_curve'] = curve
  return fields, norms


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
