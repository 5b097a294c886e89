"""The ANP-VS section of RESULTS.md: Madaan, Shin & Hwang, "Adversarial Neural Pruning with
Latent Vulnerability Suppression", ICML 2020, from the runs of configs/repro_anp.py.

Models: Standard (clean), AT ((CE_clean + 2 CE_adv) / 3), BP (Beta-Bernoulli pruning with
clean training) and ANP-VS (adversarially trained pruning masks with vulnerability
suppression). MNIST trains two ANP-VS candidates (lam = 0.001, the paper's, and 0.01) and
reports the one with the best white-box PGD-40 accuracy on the validation split (ties: the
paper's); the test split chooses nothing. Protocols:
  the paper's   white-box PGD-40 (MNIST eps 0.3, step 0.01; CIFAR-10 eps 0.03, step 0.007)
                and black-box PGD-40 crafted on the AT model;
  adaptive      per example, the worst case over every attack of the run (PGD-40, APGD-CE,
                APGD-DLR and, on MNIST AT and ANP-VS, Square).
Vulnerability: the mean |z(x) - z(x_adv)| over the latent features (advdef.pruning), and its
per-unit distribution (model_summary's white_box_per_feature), the paper's figure.

  section = anp.render(runs, 'results/anp')   # frame.Section: Markdown and PNGs
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
PAPER_LAM = 0.001
# The paper's README table (papers.md §2.8): clean, white-box, black-box (%), white-box and
# black-box vulnerability, memory %, FLOPs speed-up, sparsity %.
PAPER_NUMBERS = {
    'mnist': {
        'Standard': (99.29, 0.00, 8.02, 0.129, 0.113, 100.0, 1.00, 0.00),
        'BP': (99.34, 0.00, 12.99, 0.091, 0.078, 4.14, 9.68, 83.48),
        'AT': (99.14, 88.03, 94.18, 0.045, 0.040, 100.0, 1.00, 0.00),
        'ANP-VS': (99.05, 91.31, 95.43, 0.017, 0.015, 6.81, 10.57, 84.16),
    },
    'cifar': {
        'Standard': (92.76, 13.79, 41.65, 0.077, 0.065, 100.0, 1.00, 0.00),
        'BP': (92.91, 14.30, 42.88, 0.037, 0.033, 12.41, 2.34, 75.92),
        'AT': (87.50, 49.85, 63.70, 0.050, 0.047, 100.0, 1.00, 0.00),
        'ANP-VS': (88.18, 56.21, 71.44, 0.019, 0.016, 12.27, 2.41, 76.53),
    },
}
# Fixed before the runs.
SPARSE_PERCENT = 70.0     # "ANP-VS is sparse": at least this % of units pruned ...
CLEAN_POINTS = 1.5        # ... at clean accuracy within this many points of Standard's
VULNERABILITY_RATIO = 0.9  # "less vulnerable": V at most 0.9x the other's; above 1x: fails
NAMES = {'standard': 'Standard', 'at': 'AT', 'bp': 'BP'}


@dataclasses.dataclass
class Model:
  """One trained model's numbers on one split."""
  name: str
  clean: frame.Measure | None = None
  pgd: frame.Measure | None = None       # the paper's white-box PGD-40
  attacks: dict = dataclasses.field(default_factory=dict)   # label -> Measure
  worst: frame.Measure | None = None     # the suite's per-example worst case
  worst_over: tuple = ()
  black_box: frame.Measure | None = None
  summary: dict = dataclasses.field(default_factory=dict)
  checks: list = dataclasses.field(default_factory=list)

  @property
  def vulnerability(self) -> dict:
    return self.summary.get('vulnerability') or {}

  def get(self, key: str):
    return self.summary.get(key)


def model_name(model: str) -> str:
  """'anpvs_0.001' -> 'ANP-VS (λ = 0.001)'; 'anpvs' (CIFAR) -> 'ANP-VS'."""
  if model.startswith('anpvs'):
    return f'ANP-VS (λ = {model.split("_", 1)[1]})' if '_' in model else 'ANP-VS'
  return NAMES.get(model, model)


def lam_of(model: str) -> float | None:
  return float(model.split('_', 1)[1]) if model.startswith('anpvs_') else None


def _measure(acc, n) -> frame.Measure | None:
  if acc is None or not n:
    return None
  return frame.Measure(float(acc), tuple(evaluation.wilson_interval(acc * n, n)), int(n))


def read_model(run: frame.Run) -> Model:
  m = Model(model_name(run.experiment.model))
  report = run.report or {}
  for row in report.get('rows', []):
    if row.get('defense', 'none') != 'none':
      continue
    attack = row['attack']
    if row.get('worst_case'):
      m.worst, m.worst_over = frame.Measure.of(row), tuple(row.get('attacks') or ())
    elif attack == 'none':
      m.clean = frame.Measure.of(row)
    else:
      m.attacks[attack] = frame.Measure.of(row)
      if attack.startswith('pgd') and m.pgd is None:
        m.pgd = m.attacks[attack]
  m.summary = report.get('model_summary') or {}
  v = m.vulnerability
  if 'black_box_accuracy' in v:
    m.black_box = _measure(v['black_box_accuracy'], v.get('n'))
  if m.worst is None and m.pgd is not None and len(m.attacks) == 1:
    m.worst, m.worst_over = m.pgd, tuple(m.attacks)
  m.checks = report.get('checks') or []
  return m


def gather(runs: frame.RunSet) -> dict[str, dict[str, Model]]:
  """{'validation' | 'test' | 'cifar': {experiment model: Model}} of the finished runs."""
  out = {'validation': {}, 'test': {}, 'cifar': {}}
  key = {'train': 'validation', 'test': 'test', 'cifar': 'cifar'}
  for run in runs.finished():
    out[key[run.experiment.kind]][run.experiment.model] = read_model(run)
  return out


def candidates(runs: frame.RunSet) -> list[str]:
  return [r.experiment.model for r in runs.runs
          if r.experiment.kind == 'train' and r.experiment.model.startswith('anpvs')]


def select(validation: dict[str, Model], cands: list[str]) -> tuple[str | None, str]:
  """The rule fixed in advance: the ANP-VS candidate with the highest validation PGD-40
  accuracy; ties (and no finished candidate) go to the paper's lam. (model, why)."""
  paper = next((c for c in cands if lam_of(c) == PAPER_LAM), cands[0] if cands else None)
  scored = {c: validation[c].pgd.accuracy for c in cands
            if c in validation and validation[c].pgd is not None}
  if not scored:
    return paper, 'no candidate finished on validation; the paper\'s λ by default'
  if len(scored) < len(cands):
    return paper, ('not every candidate finished on validation; the paper\'s λ until they '
                   'have')
  best = max(scored.values())
  winners = [c for c in cands if scored[c] == best]
  if paper in winners:
    return paper, ('the highest validation PGD-40 accuracy' if len(winners) == 1 else
                   'tied on validation PGD-40: the paper\'s λ')
  return winners[0], 'the highest validation PGD-40 accuracy'


# ----------------------------------------------------------------------------------------
# Verdicts.


def vulnerability_verdict(a: float | None, b: float | None) -> str:
  """'a is less vulnerable than b': reproduced when a <= VULNERABILITY_RATIO * b, not
  reproduced when a >= b, inconclusive in between."""
  if a is None or b is None:
    return frame.NOT_RUN
  if a <= VULNERABILITY_RATIO * b:
    return frame.REPRODUCED
  return frame.NOT_REPRODUCED if a >= b else frame.INCONCLUSIVE


def _wb_v(m: Model | None) -> float | None:
  return None if m is None else m.vulnerability.get('white_box_vulnerability')


def _text(m: frame.Measure | None) -> str:
  return m.text() if m is not None else '—'


def _v(x) -> str:
  return '—' if x is None else f'{x:.3f}'


def claims(models: dict[str, Model], anp_key: str | None, dataset: str, scale: str
           ) -> list[list[str]]:
  """Claim rows: claim, source, paper's number, advdef paper's protocol, advdef adaptive,
  n, verdict."""
  paper = PAPER_NUMBERS[dataset]
  source = f'{PAPER} §2.8'
  anp = models.get(anp_key) if anp_key else None
  label = 'ANP-VS' if anp is None else anp.name
  out = []
  pgd = 'PGD-40'
  for other in ('at', 'standard'):
    o = models.get(other)
    p_anp, p_o = (anp.pgd if anp else None), (o.pgd if o else None)
    w_anp, w_o = (anp.worst if anp else None), (o.worst if o else None)
    verdict = frame.comparative_verdict(frame.compare(p_anp, p_o), frame.compare(w_anp, w_o))
    on = NAMES[other]
    out.append([f'{label} is more robust than {on} under white-box {pgd}', source,
                f'{paper["ANP-VS"][1]:.2f}% vs {paper[on][1]:.2f}%', frame.versus(p_anp, p_o, on),
                frame.versus(w_anp, w_o, on), frame.counts(p_anp, p_o, w_anp, w_o), verdict])
  for other in ('standard', 'at'):
    o = models.get(other)
    on = NAMES[other]
    a, b = _wb_v(anp), _wb_v(o)
    out.append([f'{label} is less vulnerable than {on} (white-box latent vulnerability; '
                f'≤ {VULNERABILITY_RATIO:g}× reproduces)', source,
                f'{paper["ANP-VS"][3]:.3f} vs {paper[on][3]:.3f}',
                '—' if a is None else f'{a:.3f} vs {on} {_v(b)}', 'n/a',
                frame.counts(*(_measure(0.0, m.vulnerability.get('n')) for m in (anp, o) if m)),
                vulnerability_verdict(a, b)])
  std = models.get('standard')
  sparsity = anp.get('sparsity_percent') if anp else None
  clean_a, clean_s = (anp.clean if anp else None), (std.clean if std else None)
  if sparsity is None or clean_a is None or clean_s is None:
    verdict, cell = frame.NOT_RUN, '—'
  else:
    gap = 100 * (clean_s.accuracy - clean_a.accuracy)
    ok = sparsity >= SPARSE_PERCENT and gap <= CLEAN_POINTS
    verdict = frame.REPRODUCED if ok else frame.NOT_REPRODUCED
    cell = f'{sparsity:.1f}% sparse; clean {clean_a.text()} vs Standard {clean_s.text()}'
  out.append([f'{label} is sparse (≥ {SPARSE_PERCENT:.0f}% of units pruned) at clean accuracy '
              f'within {CLEAN_POINTS:g} points of Standard', source,
              f'{paper["ANP-VS"][7]:.2f}%; {paper["ANP-VS"][0]:.2f}% vs {paper["Standard"][0]:.2f}%',
              cell, 'n/a', frame.counts(clean_a, clean_s), verdict])
  for who, key, column, what in (('ANP-VS', anp_key, 1, f'white-box {pgd}'),
                                 ('AT', 'at', 1, f'white-box {pgd}'),
                                 ('ANP-VS', anp_key, 0, 'clean')):
    m = models.get(key) if key else None
    measure = (m.pgd if column == 1 else m.clean) if m else None
    claimed = paper[who][column]
    verdict = (frame.NOT_RUN if measure is None else
               frame.value_verdict(claimed / 100, measure) if scale == 'full'
               else frame.NOT_COMPARABLE)
    out.append([f'{who} reaches {claimed:.2f}% ({what})', source, f'{claimed:.2f}%',
                _text(measure), 'n/a', frame.counts(measure), verdict])
  return out


# ----------------------------------------------------------------------------------------
# Tables.

_COLUMNS = ['model', '', 'clean', 'white-box PGD-40', 'black-box (from AT)',
            'adaptive worst case', 'WB vuln', 'BB vuln', 'memory %', 'FLOPs ×', 'sparsity %',
            'n (clean / attacked)']


def _advdef_row(m: Model, label: str) -> list:
  v = m.vulnerability
  fmt = lambda x, f: '—' if x is None else format(x, f)
  return [label, 'advdef', _text(m.clean), _text(m.pgd), _text(m.black_box), _text(m.worst),
          _v(v.get('white_box_vulnerability')), _v(v.get('black_box_vulnerability')),
          fmt(m.get('memory_percent'), '.2f'), fmt(m.get('flops_speedup'), '.2f'),
          fmt(m.get('sparsity_percent'), '.2f'), frame.counts(m.clean, m.pgd)]


def _paper_row(name: str, dataset: str) -> list:
  p = PAPER_NUMBERS[dataset][name]
  return ['', 'paper', f'{p[0]:.2f}%', f'{p[1]:.2f}%', f'{p[2]:.2f}%', '—', f'{p[3]:.3f}',
          f'{p[4]:.3f}', f'{p[5]:.2f}', f'{p[6]:.2f}', f'{p[7]:.2f}', '']


def main_table(models: dict[str, Model], order: list[tuple[str, str, str | None]],
               dataset: str) -> str:
  """order: (experiment model, label, paper row name or None)."""
  rows = []
  for key, label, paper_name in order:
    m = models.get(key)
    if m is not None:
      rows.append(_advdef_row(m, label))
    elif paper_name:
      rows.append([label, 'advdef'] + ['not finished'] + [''] * (len(_COLUMNS) - 3))
    if paper_name:
      rows.append(_paper_row(paper_name, dataset))
  if not rows:
    return 'No run has finished.\n'
  return reporting.format_table(rows, _COLUMNS)


def attack_table(models: dict[str, Model], order) -> str:
  rows = []
  for key, label, _ in order:
    m = models.get(key)
    if m is None:
      continue
    for attack, measure in m.attacks.items():
      rows.append([label, attack, measure.text(), measure.n])
    if m.worst is not None and len(m.attacks) > 1:
      rows.append([label, f'**worst case** (per example over {len(m.worst_over)})',
                   f'**{m.worst.text()}**', m.worst.n])
    if m.black_box is not None:
      rows.append([label, 'black-box: PGD-40 crafted on AT (model_summary)', m.black_box.text(),
                   m.black_box.n])
  if not rows:
    return 'No attack run has finished.\n'
  return reporting.format_table(rows, ['model', 'attack', 'accuracy [95% CI]', 'n'])


def selection_table(validation: dict[str, Model], cands: list[str], chosen: str | None) -> str:
  rows = []
  for c in cands:
    m = validation.get(c)
    if m is None:
      rows.append([model_name(c), 'not finished', '', '', ''])
      continue
    sparsity = m.get('sparsity_percent')
    rows.append([model_name(c), _text(m.clean), _text(m.pgd),
                 '—' if sparsity is None else f'{sparsity:.1f}',
                 '**selected**' if c == chosen else 'not selected'])
  return reporting.format_table(rows, ['candidate', 'validation clean', 'validation PGD-40',
                                       'sparsity %', 'rule'])


def checks_table(models: dict[str, Model], order) -> str:
  rows = []
  for key, label, _ in order:
    m = models.get(key)
    for c in (m.checks if m else []):
      rows.append([label, c.get('name', '?'), c.get('status', '?'), c.get('detail', '')])
  if not rows:
    return 'No sanity check ran.\n'
  return reporting.format_table(rows, ['model', 'check', 'status', 'detail'])


# ----------------------------------------------------------------------------------------
# Figures.


def vulnerability_figure(models: dict[str, Model], order):
  """The paper's vulnerability figure: per latent-feature site, the histogram of the
  per-unit white-box vulnerability of Standard, AT and ANP-VS."""
  drawn = [(label, models[key]) for key, label, _ in order
           if key in models and models[key].vulnerability.get('white_box_per_feature')]
  if not drawn:
    return None
  sites = [f['site'] for f in drawn[0][1].vulnerability['white_box_per_feature']]
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(3.2 * len(sites) + 1.5, 3.4), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(sites), squeeze=False)[0]
  styles = plots.style_map(label for label, _ in drawn)
  top = max(max(f['vulnerability'] or [0.0]) for _, m in drawn
            for f in m.vulnerability['white_box_per_feature']) or 1.0
  bins = np.linspace(0.0, top, 31)
  for ax, site in zip(axes, sites):
    for label, m in drawn:
      feature = next((f for f in m.vulnerability['white_box_per_feature']
                      if f['site'] == site), None)
      if feature is None:
        continue
      values = np.asarray(feature['vulnerability'])
      ax.hist(values, bins=bins, histtype='step', linewidth=1.4,
              color=styles[label]['color'], label=label if site == sites[0] else None,
              weights=np.full(len(values), 1.0 / max(len(values), 1)))
    ax.set_title(f'{site} ({len(values)} units)', fontsize=9)
    ax.set_xlabel('vulnerability |z(x) − z(x_adv)|')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('share of units')
  fig.legend(loc='outside right upper', fontsize=8, frameon=False)
  return fig


def accuracy_figure(models: dict[str, Model], order):
  """Bars with 95% intervals: clean, white-box PGD-40, adaptive worst case, black-box."""
  drawn = [(label, models[key]) for key, label, _ in order if key in models]
  if not drawn:
    return None
  kinds = (('clean', lambda m: m.clean), ('white-box PGD-40', lambda m: m.pgd),
           ('adaptive worst case', lambda m: m.worst), ('black-box from AT',
                                                        lambda m: m.black_box))
  fig, ax = frame.accuracy_figure(4.0)
  width = 0.8 / len(kinds)
  styles = plots.style_map(k for k, _ in kinds)
  for j, (kind, get) in enumerate(kinds):
    xs, ys, lo, hi = [], [], [], []
    for i, (_, m) in enumerate(drawn):
      measure = get(m)
      if measure is None:
        continue
      xs.append(i + (j - (len(kinds) - 1) / 2) * width)
      ys.append(measure.accuracy)
      lo.append(measure.accuracy - measure.ci95[0])
      hi.append(measure.ci95[1] - measure.accuracy)
    if xs:
      ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=kind,
             color=styles[kind]['color'])
  ax.set_xticks(range(len(drawn)), [label for label, _ in drawn], fontsize=8)
  return frame.finish_accuracy_figure(fig, ax, 'model (MNIST test split)')


# ----------------------------------------------------------------------------------------
# The section.


def _departures(runs: frame.RunSet) -> list[str]:
  out = []
  base, anp = runs.get('mnist_standard'), next(
      (r for r in runs.runs if r.experiment.kind == 'train'
       and r.experiment.model.startswith('anpvs')), None)
  if base:
    d, t = base.config.data, base.config.train
    sizes = estimates.DATA_SIZES.get(d.name, (d.fake_num_train, d.fake_num_test))
    out.append(f'MNIST data: `{d.source}:{d.name}`, {sizes[0]:,} training images less a '
               f'stratified {100 * d.validation_fraction:.0f}% validation split (selection '
               f'only), {sizes[1]:,} test images (paper: 60,000 / 10,000, no validation '
               'split).')
    out.append(f'MNIST base: {t.num_epochs} epochs, {t.optimizer} lr {t.learning_rate}, batch '
               f'{t.batch_size} (authors: 200 epochs).')
  if anp:
    t = anp.config.train
    out.append(f'MNIST ANP-VS: `{t.recipe}` for {t.num_epochs} epochs (authors: beta 4, lam '
               '0.001, PGD-20 at step 0.01, masks at 10×, KL over N, 200 epochs; '
               'configs/mnist_anp.py explains each change of its `cpu` schedule).')
  at = runs.get('mnist_at')
  if at:
    out.append(f'MNIST AT: `{at.config.train.recipe}` for {at.config.train.num_epochs} epochs.')
  test = next((r for r in runs.runs if r.experiment.kind == 'test'), None)
  if test:
    e = test.config.eval
    out.append(f'MNIST test evaluation: clean accuracy on the whole test split; the attacks '
               f'({", ".join(f"`{a}`" for a in test.experiment.attacks)}) and the '
               f'vulnerability on the first {e.num_attack_examples or "all"} test images. '
               'The black-box source is advdef\'s AT model itself (the paper trains a '
               'separate AT source model), so AT has no black-box number. APGD-T is not in '
               'the suite (the configs were fixed before eval.attacks could list it), so the '
               'worst case is over PGD-40, APGD-CE, APGD-DLR and Square (AT and ANP-VS), '
               'weaker than AutoAttack.')
  cifar = runs.get('cifar_anpvs')
  if cifar:
    c = cifar.config
    width = (c.model.kwargs or {}).get('width_divisor', 1)
    d = c.data
    sizes = estimates.DATA_SIZES.get(d.name, (d.fake_num_train, d.fake_num_test))
    std = runs.get('cifar_standard')
    out.append(f'CIFAR-10: `{d.source}:{d.name}` ({sizes[0]:,} / {sizes[1]:,}); `vgg16_anp`'
               + (f' at 1/{width} of the width' if width > 1 else '') + ' with per-image '
               'standardisation inside the model (pixels and eps in [0, 1] units; the '
               'authors clip standardised inputs to [0, 1], papers.md §2.6); base '
               f'{std.config.train.num_epochs if std else "?"} epochs, ANP-VS '
               f'`{c.train.recipe}` for {c.train.num_epochs} epochs (authors: beta 2, lam '
               '1e-4, PGD-10 at 0.007, 200 epochs); '
               f'{c.eval.num_attack_examples or "all"} test images attacked. No value was '
               'selected on CIFAR-10: every one is fixed in configs/repro_anp.py.')
  return out


def _not_run(runs: frame.RunSet) -> list[str]:
  out = ['The paper\'s other baselines (AT BNN, pretrained AT, ADMM, TRADES), ANP without '
         'VS, CIFAR-100, and the averages over five runs (one seed here).']
  if not any(r.experiment.kind == 'cifar' for r in runs.runs):
    out.append('CIFAR-10 (not at this scale).')
  unfinished = [r.experiment.name for r in runs.runs if r.report is None]
  if unfinished:
    out.append(f'Not finished yet: {", ".join(unfinished)}.')
  return out


def render(runs: frame.RunSet, figures_dir: str) -> frame.Section:
  """The ANP-VS section of RESULTS.md and its figures (vulnerability.png, accuracy.png)."""
  models = gather(runs)
  cands = candidates(runs)
  chosen, why = select(models['validation'], cands)
  other = [c for c in cands if c != chosen]
  mnist_order = [('standard', 'Standard', 'Standard'), ('bp', 'BP', 'BP'), ('at', 'AT', 'AT')]
  if chosen:
    mnist_order.append((chosen, f'{model_name(chosen)}, selected', 'ANP-VS'))
  mnist_order += [(c, f'{model_name(c)}, not selected on validation', None) for c in other]
  cifar_order = [('standard', 'Standard', 'Standard'), ('bp', 'BP', 'BP'), ('at', 'AT', 'AT'),
                 ('anpvs', f'ANP-VS (λ = {_cifar_lam(runs)})', 'ANP-VS')]
  fig_order = [o for o in mnist_order if o[0] in ('standard', 'at', chosen)]
  figures = {'vulnerability.png': frame.png(vulnerability_figure(models['test'], fig_order)),
             'accuracy.png': frame.png(accuracy_figure(models['test'], mnist_order))}
  cmd = f'python scripts/reproduce.py --paper=anp --scale={runs.scale} --root=DIR'
  claim_head = ['claim', 'source', "paper's number", "advdef, paper's protocol (PGD-40)",
                'advdef, adaptive (worst case)', 'n', 'verdict']
  out = [f'## {runs.paper.title}: scale `{runs.scale}`', '',
         'Adversarial Neural Pruning with Latent Vulnerability Suppression: Beta-Bernoulli '
         'pruning masks trained on the adversarial loss, and a penalty on the distortion of '
         f'the latent features. `{cmd}` ({len(runs.finished())} of {len(runs.runs)} '
         'experiments finished; configs/repro_anp.py). Source: '
         f'../shared/reference/{PAPER} §2.', '',
         f'**{frame.SCALE_NOTE[runs.scale]}**', '',
         '### Selection on the MNIST validation split', '',
         'Rule, fixed before the runs: of the ANP-VS candidates '
         f'({", ".join(f"λ = {lam_of(c):g}" for c in cands)}; the paper\'s: λ = '
         f'{PAPER_LAM:g}), the main table reports the one with the highest white-box PGD-40 '
         'accuracy on the validation split (10% of the training images, held out of every '
         'MNIST run); ties go to the paper\'s λ. The test split chooses nothing; the other '
         'candidate is reported too, marked as not selected.', '',
         selection_table(models['validation'], cands, chosen),
         f'Selected: **{model_name(chosen) if chosen else "—"}** ({why}).', '',
         '### Claims: MNIST, LeNet-5-Caffe', '',
         reporting.format_table(claims(models['test'], chosen, 'mnist', runs.scale),
                                claim_head)]
  if any(r.experiment.kind == 'cifar' for r in runs.runs):
    out += ['### Claims: CIFAR-10, VGG-16', '',
            reporting.format_table(claims(models['cifar'], 'anpvs', 'cifar', runs.scale),
                                   claim_head)]
  out += ['Departures from the paper at this scale:', '',
          *[f'- {d}' for d in _departures(runs)], '',
          frame.VERDICT_RULES,
          f'- "Less vulnerable": **{frame.REPRODUCED}** when the model\'s white-box latent '
          f'vulnerability is at most {VULNERABILITY_RATIO:g}× the other\'s, '
          f'**{frame.NOT_REPRODUCED}** when it is at least the other\'s, '
          f'**{frame.INCONCLUSIVE}** in between. "Sparse": at least {SPARSE_PERCENT:.0f}% of '
          f'the mask units pruned (E[π] ≤ 1e-3) and clean accuracy at most {CLEAN_POINTS:g} '
          'points below Standard\'s (both fixed before the runs).', '',
          '### MNIST, LeNet-5-Caffe: the paper\'s table', '',
          'Accuracies with their 95% intervals on the test split; vulnerability, memory and '
          'FLOPs as the ANP code counts them (advdef.evaluators.model_summary).', '',
          main_table(models['test'], mnist_order, 'mnist')]
  if figures['accuracy.png']:
    out += [f'![MNIST accuracies]({figures_dir}/accuracy.png)', '']
  if figures['vulnerability.png']:
    out += ['Per-unit white-box vulnerability (the paper\'s vulnerability figure): the share '
            'of each latent feature\'s units at each distortion; pruned units sit at 0.', '',
            f'![per-feature vulnerability]({figures_dir}/vulnerability.png)', '']
  out += ['#### Every attack', '', attack_table(models['test'], mnist_order),
          '#### Sanity checks', '', checks_table(models['test'], mnist_order)]
  if any(r.experiment.kind == 'cifar' for r in runs.runs):
    out += ['### CIFAR-10, VGG-16', '', main_table(models['cifar'], cifar_order, 'cifar'),
            '#### Every attack', '', attack_table(models['cifar'], cifar_order)]
  out += ['### Not run at this scale', '', *[f'- {n}' for n in _not_run(runs)], '',
          '### Run time', '', frame.timing_table(runs)]
  return frame.Section('\n'.join(out), figures)


def _cifar_lam(runs: frame.RunSet) -> str:
  run = runs.get('cifar_anpvs')
  if run is None:
    return '1e-4'
  (_, kwargs), = config_utils.parse_spec(run.config.train.recipe)
  return f'{float(kwargs.get("lam", 0)):g}'
