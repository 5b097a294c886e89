"""The RSE section of RESULTS.md: Liu et al., "Towards Robust Neural Networks via Random
Self-ensemble", ECCV 2018, from the runs of configs/repro_rse.py.

Models: 'undefended' (VGG trained without noise), 'noise at inference' (the same network with
RSE's noise layers retrofitted at test time only), 'RSE' (noisy training and the
self-ensemble) and 'PGD-AT'. Protocols:
  the paper's   C&W L2 with one noise draw per step for the noisy models (the authors'
                attack), robust accuracy against the distortion tolerance;
  adaptive      per example, the worst case over every attack run on the same examples: at
                each tolerance t, C&W with one draw, with EOT and crafted on the noiseless
                network, and PGD-L2 at eps <= t; PGD and APGD with EOT, one draw and transfer
                at the fixed budgets.
Every adversarial example is judged by the defense's own decision rule on fresh draws (the
mean softmax of 50 draws), never on the attack's draws.

  section = rse.render(runs, 'results/rse')   # frame.Section: Markdown and PNGs
"""

from __future__ import annotations

import dataclasses

import numpy as np

from advdef import config_utils
from advdef import evaluation
from advdef import plots
from advdef import reporting
from advdef.reproduce import estimates
from advdef.reproduce import frame

PAPER = 'papers.md'
ORDER = ('undefended', 'noise at inference', 'RSE', 'PGD-AT')
UNPROTECTED_BELOW = 0.10   # the abstract: "the unprotected model drops to less than 10%"
PAPER_RSE = 0.86           # ... "our method still has 86%"
PAPER_BEST_PREVIOUS = 0.48  # ... "the best previous defense technique has 48%"
SATURATION_POINTS = 0.02   # ensemble accuracy at n = 10 within 2 points of n = 50


@dataclasses.dataclass
class Attacked:
  """One attack row with its per-example arrays (None when not stored)."""
  row: dict
  correct: np.ndarray | None
  norms: np.ndarray | None = None

  @property
  def label(self) -> str:
    return self.row['attack']

  @property
  def paper_protocol(self) -> bool:
    """The authors' attack: one draw per step on noisy models (deterministic: the only one)."""
    return not self.row.get('stochastic') or self.label.endswith('+1draw')


@dataclasses.dataclass
class Model:
  name: str
  stochastic: bool = False
  clean_full: dict | None = None   # the whole test split (the training run)
  clean: dict | None = None        # the attacked examples
  cw: list = dataclasses.field(default_factory=list)      # Attacked, C&W
  l2: list = dataclasses.field(default_factory=list)      # Attacked, PGD-L2 at L2_EPS
  linf: list = dataclasses.field(default_factory=list)    # Attacked, L-inf 8/255

  def curve(self, tolerances, paper_only: bool) -> list[frame.Measure | None]:
    """Robust accuracy at each tolerance, per example: broken at t when some C&W row's
    adversarial example within t fools the defense on fresh draws (the paper's row only, or
    every row) and, adaptive only, when a fixed-budget L2 attack at eps <= t does (C&W's
    boundary points can fail on fresh draws of a noisy model where PGD's do not)."""
    rows = [a for a in self.cw if a.paper_protocol or not paper_only]
    budget = [] if paper_only else [a for a in self.l2 if a.correct is not None]
    if not rows or any(a.correct is None or a.norms is None for a in rows):
      return [None] * len(tolerances)
    n = min(len(a.correct) for a in rows + budget)
    out = []
    for t in tolerances:
      broken = np.logical_or.reduce(
          [~a.correct[:n] & (a.norms[:n] <= t) for a in rows]
          + [~a.correct[:n] for a in budget if float(a.row['epsilon']) <= t])
      acc = float(np.mean(~broken))
      out.append(frame.Measure(acc, tuple(evaluation.wilson_interval(acc * n, n)), n))
    return out

  def worst(self, rows: list[Attacked], extra: list[np.ndarray] = ()) -> frame.Measure | None:
    """Per-example worst case over rows (and extra robust masks)."""
    masks = [a.correct for a in rows] + list(extra)
    if not masks or any(m is None for m in masks):
      return None
    n = min(len(m) for m in masks)
    acc = float(np.mean(np.logical_and.reduce([m[:n] for m in masks])))
    return frame.Measure(acc, tuple(evaluation.wilson_interval(acc * n, n)), n)


def model_name(trained: str, defense: str) -> str:
  if trained == 'pgd_at':
    return 'PGD-AT'
  stochastic = defense != 'none'
  if trained == 'rse':
    return 'RSE' if stochastic else 'RSE without noise'
  return 'noise at inference' if stochastic else 'undefended'


def tolerances(runs: frame.RunSet) -> tuple[float, ...]:
  for r in runs.runs:
    if r.config.eval.tolerances:
      return tuple(float(t) for t in r.config.eval.tolerances)
  return ()


def gather(runs: frame.RunSet) -> dict[str, Model]:
  models: dict[str, Model] = {}
  for run in runs.finished():
    kind = run.experiment.kind
    correct = frame.per_example(run) if kind != 'train' else {}
    norms = frame.per_example(run, 'perturbation_norm') if kind != 'train' else {}
    for row in run.report['rows']:
      if row.get('worst_case'):
        continue
      name = model_name(run.experiment.model, config_utils.spec_name(row['defense']))
      m = models.setdefault(name, Model(name, stochastic=bool(row.get('stochastic'))))
      if row['attack'] == 'none':
        if kind == 'train':
          m.clean_full = row
        elif m.clean is None:
          m.clean = row
        continue
      key = (row['defense'], row['attack'], row['epsilon'])
      a = Attacked(row, correct.get(key), norms.get(key))
      if row['attack'].startswith('cw_l2'):
        m.cw.append(a)
      elif row['norm'] == 'l2':
        m.l2.append(a)
      else:
        m.linf.append(a)
  return {k: models[k] for k in sorted(models, key=lambda k: (
      ORDER.index(k) if k in ORDER else len(ORDER), k))}


# ----------------------------------------------------------------------------------------
# Claims.


def reference_tolerance(models: dict[str, Model], tols) -> float | None:
  """The abstract's "certain distortion tolerance": the smallest tolerance at which the
  undefended model's C&W accuracy is below 10% (fixed as the rule before the runs)."""
  m = models.get('undefended')
  if m is None or not tols:
    return None
  for t, a in zip(tols, m.curve(tols, paper_only=True)):
    if a is not None and a.accuracy < UNPROTECTED_BELOW:
      return t
  return None


def _at(models, name, tols, t, paper_only):
  m = models.get(name)
  if m is None or t is None:
    return None
  return m.curve(tols, paper_only)[tols.index(t)]


def ensemble_points(row: dict | None) -> dict[int, frame.Measure]:
  if not row or not row.get('ensemble'):
    return {}
  return {int(p['draws']): frame.Measure(float(p['accuracy']), tuple(p['ci95']), int(row['n']))
          for p in row['ensemble']}


def claims(models: dict[str, Model], tols, scale: str) -> list[list[str]]:
  source = f'{PAPER} §4.5 (abstract)'
  t = reference_tolerance(models, tols)
  t_text = f't* = {t:g}' if t is not None else 't*: none of the tolerances'
  out = []
  und_p = _at(models, 'undefended', tols, t, True)
  undefended = models.get('undefended')
  out.append([f'Under C&W L2 within a distortion tolerance the unprotected VGG drops below 10% '
              f'({t_text}: the smallest tolerance where it does; the paper does not give its '
              'value)', source, '< 10%', frame.versus(und_p, None, ''), 'n/a (deterministic)',
              frame.counts(und_p), frame.NOT_RUN if undefended is None or not undefended.cw else
              frame.REPRODUCED if t is not None else frame.NOT_REPRODUCED])
  rse_p, rse_a = (_at(models, 'RSE', tols, t, p) for p in (True, False))
  for other, label, number in (
      ('undefended', 'the unprotected model', '< 10%'),
      ('PGD-AT', 'PGD adversarial training (the paper\'s best previous defense is not named '
       'in the sources; Madry et al.\'s is the standard one)', '48%'),
      ('noise at inference', 'the same noise at inference only (a baseline of the paper)',
       'not available in the sources')):
    o_p, o_a = (_at(models, other, tols, t, p) for p in (True, False))
    verdict = frame.comparative_verdict(frame.compare(rse_p, o_p), frame.compare(rse_a, o_a))
    out.append([f'RSE is more accurate than {label} under C&W at {t_text}',
                source if other != 'noise at inference' else f'{PAPER} §4.4 [UNVERIFIED]',
                f'86% vs {number}', frame.versus(rse_p, o_p, other), frame.versus(rse_a, o_a, other),
                frame.counts(rse_p, rse_a), verdict])
  out.append(['RSE keeps 86% under C&W at the tolerance where the unprotected model is below '
              '10%', source, '86%', frame.versus(rse_p, None, ''), frame.versus(rse_a, None, ''), frame.counts(rse_p),
              frame.NOT_RUN if rse_p is None else frame.value_verdict(PAPER_RSE, rse_p)
              if scale == 'full' else frame.NOT_COMPARABLE])
  rse = models.get('RSE')
  points = ensemble_points(rse.clean_full if rse else None)
  if 10 in points and max(points) > 10:
    top = points[max(points)]
    ok = abs(points[10].accuracy - top.accuracy) <= SATURATION_POINTS
    cell = (f'n = 1: {points[min(points)].text()}; n = 10: {points[10].text()}; '
            f'n = {max(points)}: {top.text()}')
    verdict = frame.REPRODUCED if ok else frame.NOT_REPRODUCED
  else:
    cell, verdict = '—', frame.NOT_RUN
  out.append(['The self-ensemble\'s clean accuracy saturates by about 10 draws (within '
              f'{100 * SATURATION_POINTS:.0f} points of n = {max(points) if points else 50})',
              f'{PAPER} §4.2 [UNVERIFIED]', 'not available in the sources (a figure)', cell,
              'n/a', frame.counts(*points.values()), verdict])
  und = models.get('undefended')
  full = frame.Measure.of(und.clean_full if und else None)
  out.append(['The unprotected VGG-16 reaches 92% clean accuracy', source, '92%',
              frame.versus(full, None, ''), 'n/a', frame.counts(full), frame.NOT_RUN if full is None else
              frame.value_verdict(0.92, full) if scale == 'full' else frame.NOT_COMPARABLE])
  return out


# ----------------------------------------------------------------------------------------
# Tables.


def _tolerance_table(models: dict[str, Model], tols) -> str:
  rows = []
  for m in models.values():
    if not m.cw:
      continue
    for paper_only in (True, False):
      curve = m.curve(tols, paper_only)
      if paper_only:
        name = "one draw per step (the authors' attack)" if m.stochastic else 'white-box'
      else:
        name = ('per-example worst of every C&W row (1 draw, EOT, transfer) and of PGD-L2 at '
                't >= its eps' if m.stochastic else 'per-example worst of C&W and of PGD-L2 at '
                't >= its eps')
      rows.append([m.name, name] + [c.text() if c else '—' for c in curve] + [frame.counts(*curve)])
  if not rows:
    return 'No C&W run has finished.\n'
  return reporting.format_table(rows, ['model', 'C&W'] + [f't = {t:g}' for t in tols] + ['n'])


def _budget_table(models: dict[str, Model], attr: str, budget: str, tols) -> str:
  rows = []
  for m in models.values():
    attacked = getattr(m, attr)
    if not attacked:
      continue
    clean = frame.Measure.of(m.clean)
    if clean:
      rows.append([m.name, 'none (clean)', '—', clean.text(), clean.n])
    extra = []
    for a in attacked:
      rows.append([m.name, a.label, a.row.get('threat', '—'), frame.Measure.of(a.row).text(),
                   a.row['n']])
    if attr == 'l2' and m.cw:  # C&W within the same budget counts as an attack at it
      budget_eps = float(attacked[0].row['epsilon'])
      for a in m.cw:
        if a.correct is not None and a.norms is not None:
          extra.append(~(~a.correct & (a.norms <= budget_eps)))
      label = f'C&W within {budget_eps:g}'
      if extra:
        acc = float(np.mean(np.logical_and.reduce(extra)))
        rows.append([m.name, label, 'minimum-perturbation, judged on fresh draws',
                     f'{100 * acc:.1f}%', len(extra[0])])
    w = m.worst(attacked, extra)
    if w is not None:
      rows.append([m.name, '**worst case** (per example)', 'all of the above',
                   f'**{w.text()}**', w.n])
  if not rows:
    return f'No {budget} run has finished.\n'
  return reporting.format_table(rows, ['model', f'attack at {budget}', 'threat',
                                       'accuracy [95% CI]', 'n'])


def _ensemble_table(models: dict[str, Model]) -> str:
  rows, sizes = [], set()
  entries = []
  for m in models.values():
    if not m.stochastic:
      continue
    entries.append((m.name, 'clean, whole test split', ensemble_points(m.clean_full)))
    for a in m.linf:
      if a.row.get('ensemble') and 'eot' in a.label:
        entries.append((m.name, f'{a.label} at 8/255', ensemble_points(a.row)))
  for _, _, p in entries:
    sizes |= set(p)
  sizes = sorted(sizes)
  for name, what, p in entries:
    if p:
      rows.append([name, what] + [p[n].text() if n in p else '—' for n in sizes]
                  + [frame.counts(*p.values())])
  if not rows:
    return 'No ensemble-size result yet.\n'
  return reporting.format_table(rows, ['model', 'scored on'] + [f'n = {n}' for n in sizes]
                                + ['n (examples)'])


def _departures(runs: frame.RunSet) -> list[str]:
  out = []
  train, at = runs.get('rse'), runs.get('pgd_at')
  if train:
    c = train.config
    t, data = c.train, c.data
    sizes = estimates.DATA_SIZES.get(data.name, (data.fake_num_train, data.fake_num_test))
    out.append(f'Data: `{data.source}:{data.name}`, {sizes[0]:,} training / {sizes[1]:,} test '
               'images (paper: CIFAR-10, 50,000 / 10,000).')
    width = c.model.kwargs.get('width_divisor', 1) if c.model.kwargs else 1
    out.append(f'Model: `{c.model.name}`' + (f' at 1/{width} of the width' if width > 1 else '')
               + ' (paper: VGG-16, 64..512 channels); noise before every convolution, '
               f'`{t.defense}` in training and at inference (the authors\' values).')
    schedule = (f'×{t.decay_factor} at epochs {", ".join(f"{b:g}" for b in t.boundaries)}'
                if t.schedule == 'piecewise' else f'{t.schedule} schedule')
    out.append(f'Training: {t.num_epochs} epochs, batch {t.batch_size}, {t.optimizer} lr '
               f'{t.learning_rate} ({schedule}) (authors: 200 epochs, lr 0.01, ×0.1 after 80, '
               '140, 180, a new optimizer per stage).')
  if at:
    out.append(f'PGD-AT: `{at.config.train.recipe}` for {at.config.train.num_epochs} epochs '
               '(Madry et al.: 7 steps of 2/255).')
  l2 = next((r for r in runs.runs if r.experiment.kind == 'l2'), None)
  if l2:
    e = l2.config.eval
    out.append(f'C&W: `{e.attacks[0]}` on the first {e.num_attack_examples} test images, with '
               f'EOT over {e.eot_samples} draws beside one draw per step; robust accuracy at '
               'each tolerance counts an example as broken only if its adversarial example '
               'within the tolerance fools the mean softmax of '
               f'{e.num_draws} fresh draws. C&W returns its smallest successful example, so '
               'each curve is an upper bound on robust accuracy (a stronger attack can only '
               'lower it).')
    (_, cw_kwargs), = config_utils.parse_spec(e.attacks[0])
    rounds = int(cw_kwargs.get('search_steps', 9))
    if rounds < 9:
      out.append(f'C&W\'s search starts at c = 1e-3 and multiplies c by 10 per round until it '
                 f'succeeds, so {rounds} rounds reach at most c = {10.0 ** (rounds - 4):g}: at '
                 'this budget C&W is weaker than PGD-L2 on robust models (compare "C&W within '
                 '0.5" with PGD in the L2 table), which is why the adaptive curve also counts '
                 'PGD-L2 at every tolerance at or above its eps.')
  out.append('No hyperparameter was chosen on the test images (none was tuned: every value '
             'is fixed in configs/repro_rse.py before the runs).')
  return out


def _not_run(runs: frame.RunSet) -> list[str]:
  out = []
  if not any('autoattack_rand' in a for r in runs.runs for a in r.experiment.attacks):
    out.append('AutoAttack-rand (full scale only: 2 × steps × 20 EOT draws per example).')
  out.append('The paper\'s other baselines (defensive distillation, adversarial retraining as '
             'the paper ran them) and its STL-10 / ImageNet experiments.')
  unfinished = [r.experiment.name for r in runs.runs if r.report is None]
  if unfinished:
    out.append(f'Not finished yet: {", ".join(unfinished)}.')
  return out


# ----------------------------------------------------------------------------------------
# Figures.


def tolerance_figure(models: dict[str, Model], tols):
  """Robust accuracy against the C&W L2 tolerance, one colour per model: solid = the
  adaptive worst case (with its 95% band), dashed = the authors' one-draw attack."""
  drawn = [m for m in models.values() if m.cw and m.curve(tols, False)[0] is not None]
  if not drawn or not tols:
    return None
  fig, ax = frame.accuracy_figure(4.2)
  styles = plots.style_map(m.name for m in drawn)
  for m in drawn:
    color = styles[m.name]['color']
    worst = m.curve(tols, False)
    ax.plot(tols, [c.accuracy for c in worst], color=color, marker='o', markersize=4,
            label=m.name + ' (adaptive worst case)')
    ax.fill_between(tols, [c.ci95[0] for c in worst], [c.ci95[1] for c in worst], color=color,
                    alpha=0.12, linewidth=0)
    if m.stochastic:
      paper = m.curve(tols, True)
      ax.plot(tols, [c.accuracy for c in paper], color=color, linestyle='--', linewidth=1,
              label=f'{m.name}: 1 draw per step (authors)')
  t = reference_tolerance(models, tols)
  if t is not None:
    ax.axvline(t, color='black', linewidth=0.8, linestyle=':',
               label=f't* = {t:g} (undefended < 10%)')
  return frame.finish_accuracy_figure(fig, ax, 'C&W L2 distortion tolerance ([0, 1] pixels)',
                                      'robust accuracy (fresh draws)')


def ensemble_figure(models: dict[str, Model]):
  """Accuracy against the ensemble size n, clean and under EOT-PGD at 8/255."""
  lines = []
  for m in models.values():
    if not m.stochastic:
      continue
    lines.append((f'{m.name}, clean', ensemble_points(m.clean_full), '-'))
    attacked = [a for a in m.linf if a.row.get('ensemble') and 'eot' in a.label]
    for a, dash in zip(attacked, ('--', ':', '-.') * len(attacked)):
      lines.append((f'{m.name}, {a.label} 8/255', ensemble_points(a.row), dash))
  lines = [line for line in lines if line[1]]
  if not lines:
    return None
  fig, ax = frame.accuracy_figure(4.0)
  styles = plots.style_map(label.split(',')[0] for label, _, _ in lines)
  for label, points, dash in lines:
    ns = sorted(points)
    ax.plot(ns, [points[n].accuracy for n in ns], linestyle=dash, marker='o', markersize=4,
            color=styles[label.split(',')[0]]['color'], label=label)
  ax.set_xscale('log')
  ax.set_xticks(sorted({n for _, p, _ in lines for n in p}),
                [str(n) for n in sorted({n for _, p, _ in lines for n in p})])
  return frame.finish_accuracy_figure(fig, ax, 'ensemble size n (draws averaged)')


def _draws(runs: frame.RunSet) -> int:
  return max((r.config.eval.num_draws for r in runs.runs), default=0)


# ----------------------------------------------------------------------------------------
# The section.


def render(runs: frame.RunSet, figures_dir: str) -> frame.Section:
  """The RSE section of RESULTS.md and its figures (tolerance.png, ensemble.png)."""
  models = gather(runs)
  tols = tolerances(runs)
  figures = {'tolerance.png': frame.png(tolerance_figure(models, tols)),
             'ensemble.png': frame.png(ensemble_figure(models))}
  cmd = f'python scripts/reproduce.py --paper=rse --scale={runs.scale} --root=DIR'
  out = [f'## {runs.paper.title}: scale `{runs.scale}`', '',
         'Random Self-Ensemble (noise before every convolution, in training and at inference; '
         f'predictions averaged over draws) on VGG-16. `{cmd}` ({len(runs.finished())} of '
         f'{len(runs.runs)} experiments finished; configs/repro_rse.py). Source: '
         f'../shared/reference/{PAPER} §4.', '',
         f'**{frame.SCALE_NOTE[runs.scale]}**', '',
         '### Claims', '',
         reporting.format_table(claims(models, tols, runs.scale),
                                ['claim', 'source', "paper's number",
                                 "advdef, paper's protocol (C&W, 1 draw per step)",
                                 'advdef, adaptive (worst case)', 'n', 'verdict']),
         'Departures from the paper at this scale:', '',
         *[f'- {d}' for d in _departures(runs)], '',
         't* is fixed by a rule chosen before the runs: the smallest tolerance at which the '
         'undefended model falls below 10% (the abstract\'s framing; the paper\'s own '
         'tolerance is not available in the sources).', '',
         frame.VERDICT_RULES, '']
  if figures['tolerance.png']:
    out += [f'![accuracy against the C&W tolerance]({figures_dir}/tolerance.png)', '']
  out += ['### C&W L2: accuracy within a distortion tolerance', '',
          _tolerance_table(models, tols),
          '### Fixed budgets: L2 and L-inf', '',
          _budget_table(models, 'l2', 'L2 0.5', tols),
          _budget_table(models, 'linf', 'L-inf 8/255', tols),
          '### Ensemble size', '',
          f'Accuracy of the mean softmax of the first n of the same {_draws(runs)} draws.', '',
          _ensemble_table(models)]
  if figures['ensemble.png']:
    out += [f'![accuracy against the ensemble size]({figures_dir}/ensemble.png)', '']
  out += ['### Not run at this scale', '', *[f'- {n}' for n in _not_run(runs)], '',
          '### Run time', '', frame.timing_table(runs)]
  return frame.Section('\n'.join(out), figures)
