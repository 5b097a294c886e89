"""The JumpReLU section of RESULTS.md: Erichson, Yao, Mahoney, "JumpReLU: A Retrofit Defense
Strategy for Adversarial Attacks", ICPRAM 2020, from the runs of configs/repro_jumprelu.py.

Models: LeNetLike (MNIST) and ResNet-20 (CIFAR-10), each trained clean ('standard') and with
the paper's FGSM mix ('robust'); JumpReLU(kappa) retrofitted after every ReLU at inference.
Attack families: the paper's four minimum-perturbation attacks (IFGSM, DeepFool L-inf and L2,
TR), each run until the example is fooled or its iteration budget is spent, and a fixed-
budget PGD (margin loss) beside them. Threats per kappa > 0: white-box (the exact gradient of
the jump), BPDA (ReLU's gradient through the jump) and gray-box (crafted once on kappa = 0,
the paper's retrofit threat). Protocols:
  the paper's gray-box   per example, fooled by any of the four paper attacks crafted on
                         kappa = 0 (at kappa = 0 itself: the white-box attacks);
  the paper's white-box  the same with the four attacks crafted on the JumpReLU model;
  adaptive               per example, the worst case over every row at that kappa: the four
                         attacks and PGD, white-box, BPDA and gray-box.
kappa* is chosen on the validation split (never the test images) by a rule fixed in advance:
the largest kappa of the grid whose validation clean accuracy is at most
configs/repro_jumprelu.KAPPA_ACCURACY_DROP below kappa = 0's.

  section = jumprelu.render(runs, 'results/jumprelu')   # frame.Section: Markdown and PNGs
"""

from __future__ import annotations

import dataclasses

import numpy as np

from advdef import config_utils
from advdef import evaluation
from advdef import reporting
from advdef.reproduce import estimates
from advdef.reproduce import frame

PAPER = 'papers.md'
FAMILIES = ('IFGSM', 'DeepFool-inf', 'DeepFool-2', 'TR', 'PGD')
PAPER_FAMILIES = FAMILIES[:4]
THREATS = ('white-box', 'BPDA', 'gray-box')
DEFAULT_ACCURACY_DROP = 0.02   # configs/repro_jumprelu.KAPPA_ACCURACY_DROP when not readable
BOOTSTRAP_SAMPLES = 2000
# Rel. Noise is a minimum perturbation only for an attack that fools (almost) every example
# at kappa = 0; for the others (IFGSM and TR at the authors' budgets) it is mostly the budget.
MIN_FOOLED = 0.9
NOISE_FACTOR = 1.1   # "larger perturbations": at least 10% more Rel. Noise at kappa*
NOT_IN_SOURCES = "not in the sources consulted (the paper's tables)"
TITLES = {'lenet': 'LeNetLike, MNIST, standard', 'lenet_robust': 'LeNetLike, MNIST, robust',
          'resnet': 'ResNet-20, CIFAR-10, standard',
          'resnet_robust': 'ResNet-20, CIFAR-10, robust'}


@dataclasses.dataclass
class Attacked:
  """One attack row with its per-example correctness (None when not stored)."""
  row: dict
  correct: np.ndarray | None


@dataclasses.dataclass
class Model:
  """One trained network: clean accuracy per kappa (validation and test) and its attack rows
  by kappa, then (family, threat)."""
  name: str
  validation: dict = dataclasses.field(default_factory=dict)   # kappa -> clean row
  test: dict = dataclasses.field(default_factory=dict)         # kappa -> clean row
  attacked: dict = dataclasses.field(default_factory=dict)     # kappa -> {(family, threat)}

  @property
  def kappas(self) -> list[float]:
    return sorted(set(self.test) | set(self.attacked) | set(self.validation))

  def rows(self, kappa: float, families=FAMILIES, threats=THREATS) -> list[Attacked]:
    return [a for (f, t), a in self.attacked.get(kappa, {}).items()
            if f in families and t in threats]

  def correct(self, kappa: float, protocol: str) -> np.ndarray | None:
    """Per example: not fooled under `protocol` ('gray-box', 'white-box', 'adaptive') at
    kappa; None when a needed row or its per-example result is missing."""
    if protocol == 'adaptive':
      families, threats = FAMILIES, THREATS
    elif protocol == 'gray-box' and kappa > 0:
      families, threats = PAPER_FAMILIES, ('gray-box',)
    else:  # white-box; at kappa = 0 the gray-box attack is the white-box one
      families, threats = PAPER_FAMILIES, ('white-box',)
    keys = [k for k in self.attacked.get(kappa, {}) if k[0] in families and k[1] in threats]
    rows = [self.attacked[kappa][k] for k in keys]
    if (not rows or any(a.correct is None for a in rows)
        or not set(PAPER_FAMILIES) <= {f for f, _ in keys}):
      return None
    n = min(len(a.correct) for a in rows)
    return np.logical_and.reduce([a.correct[:n] for a in rows])

  def measure(self, kappa: float, protocol: str) -> frame.Measure | None:
    return _measure(self.correct(kappa, protocol))

  def fixed_budget(self, kappa: float, adaptive: bool) -> frame.Measure | None:
    """PGD at its eps: white-box only, or the per-example worst over its white-box, BPDA
    and gray-box rows."""
    rows = self.rows(kappa, ('PGD',), THREATS if adaptive else ('white-box',))
    if not rows or any(a.correct is None for a in rows):
      return None
    n = min(len(a.correct) for a in rows)
    return _measure(np.logical_and.reduce([a.correct[:n] for a in rows]))


def _measure(mask: np.ndarray | None) -> frame.Measure | None:
  if mask is None or not len(mask):
    return None
  n, acc = len(mask), float(np.mean(mask))
  return frame.Measure(acc, tuple(evaluation.wilson_interval(acc * n, n)), n)


def kappa_of(defense: str) -> float | None:
  """kappa of a defense label: 0 for 'none', the jump's kappa, None for anything else."""
  if defense == 'none':
    return 0.0
  try:
    parsed = config_utils.parse_spec(defense)
  except ValueError:
    return None
  if len(parsed) == 1 and parsed[0][0] == 'jump' and 'surrogate' not in parsed[0][1]:
    return float(parsed[0][1]['kappa'])
  return None


def family_of(label: str) -> str | None:
  base = label.split('+')[0]
  if base.startswith('ifgsm_min'):
    return 'IFGSM'
  if base.startswith('deepfool'):
    return 'DeepFool-2' if 'norm=l2' in base else 'DeepFool-inf'
  if base.startswith('trust_region'):
    return 'TR'
  if base.startswith('pgd'):
    return 'PGD'
  return None


def threat_of(label: str) -> str:
  if '+transfer(' in label:
    return 'gray-box'
  if label.endswith('+bpda'):
    return 'BPDA'
  return 'white-box'


def gather(runs: frame.RunSet) -> dict[str, Model]:
  models: dict[str, Model] = {}
  for run in runs.finished():
    m = models.setdefault(run.experiment.model, Model(run.experiment.model))
    train = run.experiment.kind == 'train'
    correct = {} if train else frame.per_example(run)
    for row in run.report['rows']:
      kappa = kappa_of(row['defense'])
      if kappa is None or row.get('worst_case'):
        continue
      if row['attack'] == 'none':
        (m.validation if train else m.test)[kappa] = row
        continue
      family = family_of(row['attack'])
      if family is None:
        continue
      key = (row['defense'], row['attack'], row['epsilon'])
      m.attacked.setdefault(kappa, {})[(family, threat_of(row['attack']))] = Attacked(
          row, correct.get(key))
  return {k: models[k] for k in TITLES if k in models} | {
      k: v for k, v in models.items() if k not in TITLES}


def accuracy_drop(runs: frame.RunSet) -> float:
  try:
    return float(frame.config_module(runs.paper).KAPPA_ACCURACY_DROP)
  except (AttributeError, OSError):
    return DEFAULT_ACCURACY_DROP


def choose_kappa(m: Model, drop: float) -> float | None:
  """kappa*: the largest kappa whose validation clean accuracy is at most `drop` below
  kappa = 0's; None without validation results."""
  if 0.0 not in m.validation:
    return None
  floor = m.validation[0.0]['accuracy'] - drop - 1e-12
  ok = [k for k, row in m.validation.items() if row['accuracy'] >= floor]
  return max(ok)


# ----------------------------------------------------------------------------------------
# Claims.


def _gain_interval(robust: tuple[np.ndarray, np.ndarray], standard: tuple[np.ndarray, np.ndarray],
                   seed: int = 0) -> tuple[float, tuple[float, float]]:
  """The difference of the two models' accuracy gains (kappa* over kappa = 0) on the same
  test images, and its 95% paired-bootstrap interval (fixed seed)."""
  n = min(len(a) for pair in (robust, standard) for a in pair)
  per_example = ((robust[1][:n].astype(float) - robust[0][:n]) -
                 (standard[1][:n].astype(float) - standard[0][:n]))
  rng = np.random.default_rng(seed)
  means = per_example[rng.integers(0, n, (BOOTSTRAP_SAMPLES, n))].mean(axis=1)
  return float(per_example.mean()), (float(np.quantile(means, 0.025)),
                                     float(np.quantile(means, 0.975)))


def _difference_verdict(value: float, ci: tuple[float, float]) -> str:
  if ci[0] > 0:
    return 'holds'
  if value <= 0:
    return 'fails'
  return 'unclear'


def _mean_noise(m: Model, kappa: float, family: str, threat: str = 'white-box'):
  a = m.attacked.get(kappa, {}).get((family, threat))
  return None if a is None else a.row.get('paper_relative_noise')


def noise_claim(m: Model, k: float) -> tuple[str, str, str]:
  """(paper cell, adaptive cell, verdict) of 'the attacks need larger perturbations at
  kappa*': Rel. Noise of each paper attack that fools >= MIN_FOOLED of the examples at
  kappa = 0, white-box at kappa* (the paper's) and the smaller of white-box and BPDA
  (adaptive), against kappa = 0; a protocol holds when every such attack needs at least
  NOISE_FACTOR times kappa = 0's."""
  base = {f: m.attacked.get(0.0, {}).get((f, 'white-box')) for f in PAPER_FAMILIES}
  families = [f for f, a in base.items() if a is not None and a.row.get('paper_relative_noise')
              is not None and 1 - a.row['accuracy'] >= MIN_FOOLED]
  cells, holds = [], []
  for threats in (('white-box',), ('white-box', 'BPDA')):
    parts, ok = [], []
    for f in families:
      values = [_mean_noise(m, k, f, t) for t in threats]
      if any(v is None for v in values):
        continue
      rho0, rho = _mean_noise(m, 0.0, f), min(values)
      parts.append(f'{f} {rho0:.3g} → {rho:.3g} ({rho / rho0:.2f}×)')
      ok.append(rho >= NOISE_FACTOR * rho0)
    cells.append('; '.join(parts) or '—')
    holds.append(None if not ok else 'holds' if all(ok) else 'fails')
  verdict = frame.comparative_verdict(holds[0], holds[1])
  return cells[0], cells[1], verdict


def claims(models: dict[str, Model], chosen: dict[str, float | None], scale: str
           ) -> list[list[str]]:
  out = []
  source = f'{PAPER} §3.6 (abstract)'
  for name, m in models.items():
    k = chosen.get(name)
    if k is None or k == 0:
      text = 'kappa*: none above 0 within the accuracy drop' if k == 0 else 'kappa*: not run'
      out.append([f'{TITLES.get(name, name)}: retrofitting JumpReLU makes the model more robust '
                  f'({text})', source, NOT_IN_SOURCES, '—', '—', '—',
                  frame.NOT_RUN if k is None else frame.INCONCLUSIVE])
      continue
    for protocol in ('gray-box', 'white-box'):
      paper, paper0 = m.measure(k, protocol), m.measure(0.0, protocol)
      adaptive, adaptive0 = m.measure(k, 'adaptive'), m.measure(0.0, 'adaptive')
      verdict = frame.comparative_verdict(frame.compare(paper, paper0),
                                          frame.compare(adaptive, adaptive0))
      out.append([f'{TITLES.get(name, name)}: JumpReLU at kappa* = {k:g} is more accurate than '
                  f'kappa = 0 under the paper\'s {protocol} attacks', source, NOT_IN_SOURCES,
                  frame.versus(paper, paper0, 'kappa 0'), frame.versus(adaptive, adaptive0, 'kappa 0'),
                  frame.counts(paper, adaptive), verdict])
    paper_cell, adaptive_cell, verdict = noise_claim(m, k)
    out.append([f'{TITLES.get(name, name)}: the attacks need larger perturbations at kappa* = '
                f'{k:g} (Rel. Noise ρ, ≥ {NOISE_FACTOR:g}× kappa = 0\'s, for the attacks that '
                f'fool ≥ {100 * MIN_FOOLED:.0f}% at kappa = 0)', source, NOT_IN_SOURCES,
                paper_cell + ' (white-box)', adaptive_cell + ' (the smaller of white-box and '
                'BPDA)', frame.counts(m.measure(0.0, 'white-box')), verdict])
    pgd, pgd0 = m.fixed_budget(k, False), m.fixed_budget(0.0, False)
    worst, worst0 = m.fixed_budget(k, True), m.fixed_budget(0.0, True)
    eps = next((a.row.get('epsilon') for (f, _), a in m.attacked.get(k, {}).items() if f == 'PGD'),
               None)
    out.append([f'{TITLES.get(name, name)}: JumpReLU at kappa* = {k:g} is more accurate than '
                f'kappa = 0 under PGD-20 at L-inf {eps if eps is None else f"{eps:.3g}"} (not '
                'in the paper: a fixed budget, where the minimum-perturbation attacks have '
                'none)', 'advdef', 'n/a', frame.versus(pgd, pgd0, 'kappa 0') + ' (white-box)',
                frame.versus(worst, worst0, 'kappa 0') + ' (worst of white-box, BPDA, gray-box)',
                frame.counts(pgd, worst), frame.comparative_verdict(frame.compare(pgd, pgd0),
                                                          frame.compare(worst, worst0))])
  for standard, robust, data in (('lenet', 'lenet_robust', 'MNIST'),
                                 ('resnet', 'resnet_robust', 'CIFAR-10')):
    s, r = models.get(standard), models.get(robust)
    ks, kr = chosen.get(standard), chosen.get(robust)
    cells, verdicts = [], []
    for protocol in ('gray-box', 'adaptive'):
      masks = None
      if s and r and ks and kr:
        masks = [(m.correct(0.0, protocol), m.correct(k, protocol)) for m, k in ((r, kr), (s, ks))]
      if masks is None or any(x is None for pair in masks for x in pair):
        cells.append('—')
        verdicts.append(None)
        continue
      value, ci = _gain_interval(*masks)
      cells.append(f'{100 * value:+.1f} points [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]')
      verdicts.append(_difference_verdict(value, ci))
    out.append([f'{data}: the robust model gains more from JumpReLU (its kappa*) than the '
                'standard one (its kappa*): difference of the gains over kappa = 0', source,
                NOT_IN_SOURCES, cells[0], cells[1], '—',
                frame.comparative_verdict(verdicts[0], verdicts[1])])
  return out


# ----------------------------------------------------------------------------------------
# Tables.


def _cell(a: Attacked | None) -> str:
  if a is None:
    return '—'
  text = f'{100 * a.row["accuracy"]:.1f}%'
  rho = a.row.get('paper_relative_noise')
  return text + (f' ({rho:.3g})' if rho is not None else '')


def model_table(m: Model, chosen: float | None) -> str:
  rows = []
  for k in m.kappas:
    star = ' (kappa*)' if chosen is not None and k == chosen and k > 0 else ''
    val, test = m.validation.get(k), m.test.get(k)
    for threat in THREATS:
      if threat != 'white-box' and k == 0:
        continue
      cells = [_cell(m.attacked.get(k, {}).get((f, threat))) for f in FAMILIES]
      if all(c == '—' for c in cells) and threat != 'white-box':
        continue
      first = threat == 'white-box'
      rows.append([f'{k:g}{star}' if first else '', threat,
                   f'{100 * val["accuracy"]:.1f}%' if first and val else '',
                   f'{100 * test["accuracy"]:.1f}%' if first and test else ''] + cells)
    worst = m.measure(k, 'adaptive')
    if worst is not None:
      rows.append(['', '**worst case**', '', '', '', '', '', '', f'**{worst.text()}**'])
  if not rows:
    return 'No run of this model has finished.\n'
  eps = next((a.row['epsilon'] for d in m.attacked.values() for (f, _), a in d.items()
              if f == 'PGD'), None)
  pgd = f'PGD L-inf {eps:.3g}' if eps is not None else 'PGD'
  return reporting.format_table(rows, ['kappa', 'threat', 'clean (validation)', 'clean (test)',
                                       'IFGSM (ρ)', 'DeepFool-inf (ρ)', 'DeepFool-2 (ρ)',
                                       'TR (ρ)', pgd])


def _departures(runs: frame.RunSet, chosen: dict[str, float | None], drop: float,
                models_kappas: dict[str, list[float]]) -> list[str]:
  out = []
  for name in ('lenet', 'resnet'):
    run = runs.get(name)
    if run is None:
      continue
    c, d = run.config, run.config.data
    sizes = estimates.DATA_SIZES.get(d.name, (d.fake_num_train, d.fake_num_test))
    schedule = (f'×{c.train.decay_factor} at epochs '
                + ', '.join(f'{b:g}' for b in c.train.boundaries)
                if c.train.schedule == 'piecewise' else f'{c.train.schedule} schedule')
    out.append(f'`{c.model.name}` on `{d.source}:{d.name}` ({sizes[0]:,} training images less '
               f'the {100 * d.validation_fraction:.0f}% validation split, {sizes[1]:,} test): '
               f'{c.train.num_epochs} epochs, batch {c.train.batch_size}, lr '
               f'{c.train.learning_rate} ({schedule}); the authors: '
               + ('90 epochs on MNIST\'s 60,000' if name == 'lenet' else
                  '120 epochs on CIFAR-10\'s 50,000') + '.')
  attacked = {f'`{r.config.data.name}`': r.config.eval.num_attack_examples for r in runs.runs
              if r.experiment.kind == 'eval'}
  if attacked:
    sizes = ', '.join(f'{n} of {name}' for name, n in attacked.items())
    out.append(f'Attacks on the first test images ({sizes}; the authors: all 10,000 for '
               'IFGSM/DeepFool/TR); sizes in normalised units '
               'converted to [0, 1] pixels with the data set std. ρ = the paper\'s Rel. Noise, '
               'the mean over all attacked examples of ||δ|| / ||x|| in the normalised space '
               '(L-inf for IFGSM and DeepFool-inf, L2 for DeepFool-2 and TR).')
  picks = '; '.join(f'{TITLES.get(k, k)}: {v:g}' + (' (the grid\'s largest)' if v == max(
      models_kappas.get(k, [v])) else '') for k, v in chosen.items() if v is not None)
  out.append(f'kappa* chosen on the validation split, never on test images: the largest kappa '
             f'whose validation clean accuracy is at most {100 * drop:g} points below kappa = '
             f'0\'s (fixed before the runs). ' + (f'Chosen: {picks}.' if picks else ''))
  return out


def _not_run(runs: frame.RunSet) -> list[str]:
  out = ['AlexLike, WideResNet-34-4 and MobileNetV2 (the paper\'s other CIFAR networks), the '
         'defensive-distillation model and the C&W script the README lists but HEAD lacks.']
  if runs.scale != 'full':
    out.append('ResNet-20 at every kappa of the authors\' grid {0.01, ..., 0.09}: the cpu '
               'scale evaluates every third.')
  unfinished = [r.experiment.name for r in runs.runs if r.report is None]
  if unfinished:
    out.append(f'Not finished yet: {", ".join(unfinished)}.')
  return out


# ----------------------------------------------------------------------------------------
# Figures.

_PROTOCOL_STYLE = {'clean (test)': ('black', '-'), 'clean (validation)': ('gray', ':'),
                   'gray-box (paper)': ('tab:blue', '-'), 'white-box (paper)': ('tab:orange', '-'),
                   'adaptive worst case': ('tab:red', '-'),
                   'PGD-20 (white-box)': ('tab:purple', '--'),
                   'PGD-20, worst of its threats': ('tab:purple', '-')}


def kappa_figure(models: dict[str, Model], names: tuple[str, ...],
                 chosen: dict[str, float | None]):
  """Accuracy against kappa, one panel per model: clean (validation, test), the paper's
  gray-box and white-box protocols, the adaptive worst case and the fixed-budget PGD rows,
  with 95% bands."""
  drawn = [models[n] for n in names if n in models and models[n].kappas]
  if not drawn:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.0 * len(drawn) + 2.5, 4.0), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(drawn), squeeze=False)[0]
  for ax, m in zip(axes, drawn):
    ks = m.kappas
    lines = {
        'clean (test)': [frame.Measure.of(m.test.get(k)) for k in ks],
        'clean (validation)': [frame.Measure.of(m.validation.get(k)) for k in ks],
        'gray-box (paper)': [m.measure(k, 'gray-box') for k in ks],
        'white-box (paper)': [m.measure(k, 'white-box') for k in ks],
        'adaptive worst case': [m.measure(k, 'adaptive') for k in ks],
        'PGD-20 (white-box)': [m.fixed_budget(k, False) for k in ks],
        'PGD-20, worst of its threats': [m.fixed_budget(k, True) for k in ks],
    }
    for label, points in lines.items():
      xs = [k for k, p in zip(ks, points) if p is not None]
      ps = [p for p in points if p is not None]
      if not ps:
        continue
      color, dash = _PROTOCOL_STYLE[label]
      ax.plot(xs, [p.accuracy for p in ps], color=color, linestyle=dash, marker='o',
              markersize=4, label=label if m is drawn[0] else None)
      ax.fill_between(xs, [p.ci95[0] for p in ps], [p.ci95[1] for p in ps], color=color,
                      alpha=0.1, linewidth=0)
    k = chosen.get(m.name)
    if k:
      ax.axvline(k, color='black', linewidth=0.8, linestyle=':',
                 label='kappa* (validation)' if m is drawn[0] else None)
    ax.set_title(TITLES.get(m.name, m.name), fontsize=10)
    ax.set_xlabel('kappa (activation units)')
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(lambda v, _: f'{100 * v:.0f}%')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('accuracy')
  fig.legend(loc='outside right upper', fontsize=8, frameon=False)
  return fig


# ----------------------------------------------------------------------------------------
# The section.


def render(runs: frame.RunSet, figures_dir: str) -> frame.Section:
  """The JumpReLU section of RESULTS.md and its figures (kappa_mnist.png, kappa_cifar.png)."""
  models = gather(runs)
  drop = accuracy_drop(runs)
  chosen = {name: choose_kappa(m, drop) for name, m in models.items()}
  figures = {'kappa_mnist.png': frame.png(kappa_figure(models, ('lenet', 'lenet_robust'),
                                                       chosen)),
             'kappa_cifar.png': frame.png(kappa_figure(models, ('resnet', 'resnet_robust'),
                                                       chosen))}
  cmd = f'python scripts/reproduce.py --paper=jumprelu --scale={runs.scale} --root=DIR'
  out = [f'## {runs.paper.title}: scale `{runs.scale}`', '',
         'JumpReLU (x · 1[x > κ] after every ReLU, retrofitted at inference onto networks '
         f'trained with ReLU). `{cmd}` ({len(runs.finished())} of {len(runs.runs)} experiments '
         f'finished; configs/repro_jumprelu.py). Source: ../shared/reference/{PAPER} §3.', '',
         f'**{frame.SCALE_NOTE[runs.scale]}**', '',
         '### Claims', '',
         reporting.format_table(claims(models, chosen, runs.scale),
                                ['claim', 'source', "paper's number",
                                 "advdef, paper's protocol", 'advdef, adaptive (worst case)',
                                 'n', 'verdict']),
         'The paper\'s protocols: an example counts as robust when none of IFGSM, DeepFool-inf, '
         'DeepFool-2 and TR fools it within its iteration budget (gray-box: crafted on κ = 0; '
         'white-box: on the JumpReLU model). Adaptive: none of every row at that κ fools it '
         '(the four attacks and PGD, each white-box, with BPDA through ReLU\'s gradient and '
         'gray-box). The gain claim compares accuracy gains on the same test images with a '
         f'paired bootstrap ({BOOTSTRAP_SAMPLES} resamples, fixed seed): *holds* when its 95% '
         'interval lies above 0.', '',
         'Departures from the paper at this scale:', '',
         *[f'- {d}' for d in _departures(runs, chosen, drop,
                                         {k: m.kappas for k, m in models.items()})], '',
         frame.VERDICT_RULES, '']
  for name, png in figures.items():
    if png:
      out += [f'![accuracy against kappa]({figures_dir}/{name})', '']
  out += ['### Accuracy (ρ = Rel. Noise) per kappa and threat', '',
          'Each attack cell: accuracy on the attacked examples (not fooled within the '
          'iteration budget) and, for the minimum-perturbation attacks, ρ. White-box at κ = 0 '
          'is also the gray-box attack of every κ.', '']
  for name, m in models.items():
    out += [f'**{TITLES.get(name, name)}**', '', model_table(m, chosen.get(name))]
  out += ['### Not run at this scale', '', *[f'- {n}' for n in _not_run(runs)], '',
          '### Run time', '', frame.timing_table(runs)]
  return frame.Section('\n'.join(out), figures)
