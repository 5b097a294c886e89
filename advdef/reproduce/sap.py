"""The SAP section of RESULTS.md: Dhillon et al., "Stochastic Activation Pruning for Robust
Adversarial Defense", ICLR 2018, from the runs of configs/repro_sap.py.

Rows are gathered by model (the trained network and the defense spec: dense, SAP-k, ADV,
ADV+SAP-k; a `gradient=identity` spec is SAP-k attacked through BPDA) and protocol: the
paper's (the FGSM rows: FGSM on the mean of sampled gradients at every lambda, mean-softmax
prediction) and the adaptive suite (every other attack, at 8/255). A model's adaptive worst case
is per example over every attack run on the same examples at 8/255 (the paper's FGSM at
lambda = 8 included), from the runs' stored per-example results.

  section = sap.render(runs, 'results/sap')   # frame.Section: Markdown and PNGs
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

ADAPTIVE_LAMBDA = 8
ORDER = ('dense', 'SAP-10', 'SAP-20', 'SAP-50', 'SAP-100', 'ADV', 'ADV+SAP-100')
PAPER = 'papers.md'
ADAPTIVE_DOC = 'adaptive-evaluation.md'


@dataclasses.dataclass
class Model:
  """One model's rows. fgsm / transfer: lambda -> row; adaptive: rows at 8/255 (BPDA rows'
  attack names start with 'BPDA: '); parts: (label, bool[n] or None) of every attack at 8/255."""
  name: str
  clean: dict | None = None          # on the attacked examples (the paper-protocol run)
  clean_full: dict | None = None     # on the whole test split (the training run)
  fgsm: dict = dataclasses.field(default_factory=dict)
  transfer: dict = dataclasses.field(default_factory=dict)
  adaptive: list = dataclasses.field(default_factory=list)
  parts: list = dataclasses.field(default_factory=list)

  def worst(self) -> tuple[frame.Measure | None, str]:
    """The adaptive per-example worst case and how it was obtained."""
    if not self.adaptive:
      return None, ''
    arrays = [a for _, a in self.parts]
    if all(a is not None for a in arrays):
      n = min(len(a) for a in arrays)
      robust = np.logical_and.reduce([a[:n] for a in arrays])
      acc = float(np.mean(robust))
      return (frame.Measure(acc, tuple(evaluation.wilson_interval(acc * n, n)), n),
              f'per example over {len(arrays)} attacks')
    rows = self.adaptive + [r[ADAPTIVE_LAMBDA] for r in (self.fgsm, self.transfer)
                            if ADAPTIVE_LAMBDA in r]
    low = min(rows, key=lambda r: r['accuracy'])
    return (frame.Measure.of(low),
            'minimum over attacks (per-example results missing): an upper bound')


def model_name(trained: str, label: str) -> tuple[str, bool]:
  """(display name, is BPDA) of a defense label on a trained model ('dense' or 'adv')."""
  prefix = 'ADV+' if trained == 'adv' else ''
  if label == 'none':
    return ('ADV' if trained == 'adv' else 'dense'), False
  (name, kwargs), = config_utils.parse_spec(label)
  if name != 'sap':
    return prefix + label, False
  return f'{prefix}SAP-{round(100 * float(kwargs.get("frac", 1.0)))}', \
      kwargs.get('gradient') == 'identity'


def _lam(eps) -> int:
  return int(round(float(eps) * 255))


def gather(runs: frame.RunSet) -> dict[str, Model]:
  models: dict[str, Model] = {}
  for run in runs.finished():
    kind = run.experiment.kind
    arrays = frame.per_example(run) if kind != 'train' else {}
    for row in run.report['rows']:
      if row.get('worst_case'):
        continue  # recomputed per model, across runs
      name, bpda = model_name(run.experiment.model, row['defense'])
      bpda = bpda or row['attack'].endswith('+bpda')  # the suite's own BPDA rows
      m = models.setdefault(name, Model(name))
      if row['attack'] == 'none':
        if kind == 'train':
          m.clean_full = row
        elif not bpda and (m.clean is None or any(
            a.startswith('fgsm') for a in run.experiment.attacks)):
          m.clean = row
        continue
      lam = _lam(row['epsilon'])
      if lam == ADAPTIVE_LAMBDA:
        key = (row['defense'], row['attack'], row['epsilon'])
        m.parts.append((row['attack'], arrays.get(key)))
      if row['attack'].startswith('fgsm') and not bpda:  # the paper's protocol
        (m.transfer if 'transfer' in row['attack'] else m.fgsm)[lam] = row
      elif lam == ADAPTIVE_LAMBDA:
        if bpda and 'transfer' in row['attack']:  # crafted on another model: not BPDA
          row = dict(row, attack=row['attack'] + ' (in the BPDA run)')
        elif bpda:
          row = dict(row, attack='BPDA: ' + row['attack'],
                     threat=f"BPDA (identity backward through SAP), {row.get('threat', '')}")
        m.adaptive.append(row)
  return {k: models[k] for k in sorted(models, key=lambda k: (
      ORDER.index(k) if k in ORDER else len(ORDER), k))}


# ----------------------------------------------------------------------------------------
# Claims.


def _ece(row) -> float | None:
  return None if row is None or row.get('ece') is None else float(row['ece'])


def claims(models: dict[str, Model], scale: str) -> list[list[str]]:
  """The claim rows: claim, source, paper's number, advdef paper protocol, advdef adaptive,
  n, verdict."""
  get = models.get
  dense, out = get('dense'), []
  d_fgsm = frame.Measure.of(dense.fgsm.get(ADAPTIVE_LAMBDA)) if dense else None
  d_worst = dense.worst()[0] if dense else None
  robust_source = f'{PAPER} §1.5 (abstract); protocol §1.4'
  for k in (10, 20, 50, 100):
    m = get(f'SAP-{k}')
    p = frame.Measure.of(m.fgsm.get(ADAPTIVE_LAMBDA)) if m else None
    w = m.worst()[0] if m else None
    verdict = frame.comparative_verdict(frame.compare(p, d_fgsm), frame.compare(w, d_worst)
                                        if w is not None else None)
    out.append([f'SAP-{k} is more accurate than the dense model under attack (λ = 8)',
                robust_source, 'not available in the sources (curves only)',
                frame.versus(p, d_fgsm, 'dense'), frame.versus(w, d_worst, 'dense'), frame.counts(p, w), verdict])
  for k in (10, 20, 50, 100):
    m = get(f'SAP-{k}')
    pairs, cells = [], []
    for what, row_of in (('clean', lambda x: x.clean),
                         ('FGSM λ = 8', lambda x: x.fgsm.get(ADAPTIVE_LAMBDA))):
      a, b = (row_of(m) if m else None), (row_of(dense) if dense else None)
      pairs.append((_ece(a), _ece(b), int(a['n']) if a else 0))
      if _ece(a) is not None and _ece(b) is not None:
        cells.append(f'ECE {what}: {_ece(a):.3f} vs dense {_ece(b):.3f}')
    out.append([f'SAP-{k} preserves calibration', f'{PAPER} §1.5 (abstract)',
                'not available in the sources (a figure)', '; '.join(cells) or '—',
                'n/a (claimed for the paper\'s protocol)', frame.counts(frame.Measure.of(
                    m.clean if m else None)), frame.calibration_verdict(pairs)])
  s100 = get('SAP-100')
  w100 = s100.worst()[0] if s100 else None
  p100 = frame.Measure.of(s100.fgsm.get(ADAPTIVE_LAMBDA)) if s100 else None
  out.append(['SAP is broken at 8/255: 0% accuracy under EOT (Athalye et al. 2018)',
              f'{ADAPTIVE_DOC} §1.3; {PAPER} §1.5', '0%',
              f'(the paper\'s FGSM, SAP-100) {frame.versus(p100, None, "")}', frame.versus(w100, None, ''),
              frame.counts(p100, w100), frame.value_verdict(0.0, w100)])
  bpda = [r for r in (s100.adaptive if s100 else []) if r['attack'].startswith('BPDA: ')]
  b = frame.Measure.of(min(bpda, key=lambda r: r['accuracy'])) if bpda else None
  out.append(['BPDA through SAP reaches about 0.1% (Dhillon & Carlini 2020 erratum, '
              '[memory], unverified)', f'{ADAPTIVE_DOC} §1.5', '≈ 0.1%', 'n/a',
              f'(BPDA, SAP-100) {frame.versus(b, None, "")}', frame.counts(b), frame.value_verdict(0.001, b)])
  full = frame.Measure.of((dense.clean_full or dense.clean) if dense else None)
  out.append(['Dense ResNet-20 clean accuracy ≈ 89.8%', f'{PAPER} §1.3 [UNVERIFIED]', '89.8%',
              frame.versus(full, None, ''), 'n/a', frame.counts(full),
              frame.NOT_RUN if full is None else frame.value_verdict(0.898, full)
              if scale == 'full' else frame.NOT_COMPARABLE])
  adv = get('ADV')
  adv_clean = frame.Measure.of((adv.clean_full or adv.clean) if adv else None)
  out.append(['The ADV model (80% clean + 20% FGSM at λ = 2) reaches 75.0% clean',
              f'{PAPER} §1.3 [PAGE]', '75.0%', frame.versus(adv_clean, None, ''), 'n/a', frame.counts(adv_clean),
              frame.NOT_RUN if adv_clean is None else frame.value_verdict(0.75, adv_clean)
              if scale == 'full' else frame.NOT_COMPARABLE])
  a100 = get('ADV+SAP-100')
  pa = frame.Measure.of(a100.fgsm.get(ADAPTIVE_LAMBDA)) if a100 else None
  pb = frame.Measure.of(adv.fgsm.get(ADAPTIVE_LAMBDA)) if adv else None
  wa, wb = (a100.worst()[0] if a100 else None), (adv.worst()[0] if adv else None)
  out.append(['ADV+SAP-100 is more accurate than ADV under attack (λ = 8)',
              f'{PAPER} §1.3 (ADV+SAP evaluated; its numbers are not available in the sources)',
              'not available in the sources', frame.versus(pa, pb, 'ADV'), frame.versus(wa, wb, 'ADV'), frame.counts(pa, wa),
              frame.comparative_verdict(frame.compare(pa, pb),
                                        frame.compare(wa, wb) if wa else None)])
  out.append(['Random noisy / randomly scaled activations (RNA, RSA) and test-time dropout '
              'are less robust than SAP at matched clean accuracy', f'{PAPER} §1.4 [2nd]',
              'not available in the sources', '—', '—', '—', frame.NOT_RUN])
  return out


# ----------------------------------------------------------------------------------------
# Tables and notes.


def _fgsm_table(models: dict[str, Model]) -> str:
  lams = sorted({lam for m in models.values() for lam in m.fgsm})
  rows = []
  for m in models.values():
    if not m.fgsm:
      continue
    clean = frame.Measure.of(m.clean)
    rows.append([m.name, clean.text() if clean else '—']
                + [frame.Measure.of(m.fgsm[lam]).text() if lam in m.fgsm else '—'
                   for lam in lams] + [frame.counts(*(frame.Measure.of(r) for r in m.fgsm.values()))])
    if m.transfer:
      rows.append([f'{m.name}, FGSM crafted on the undefended model', '—']
                  + [frame.Measure.of(m.transfer[lam]).text() if lam in m.transfer else '—'
                     for lam in lams] + [frame.counts(*(frame.Measure.of(r)
                                               for r in m.transfer.values()))])
  if not rows:
    return 'No paper-protocol run has finished.\n'
  return reporting.format_table(rows, ['model', 'λ = 0 (clean)']
                                + [f'λ = {lam}' for lam in lams] + ['n'])


def _adaptive_table(models: dict[str, Model]) -> str:
  rows = []
  for m in models.values():
    if not m.adaptive:
      continue
    clean = frame.Measure.of(m.clean)
    if clean:
      rows.append([m.name, 'none (clean)', '—', clean.text(), clean.n])
    if ADAPTIVE_LAMBDA in m.fgsm:
      f = frame.Measure.of(m.fgsm[ADAPTIVE_LAMBDA])
      rows.append([m.name, m.fgsm[ADAPTIVE_LAMBDA]['attack'], "the paper's FGSM", f.text(), f.n])
    if ADAPTIVE_LAMBDA in m.transfer:
      f = frame.Measure.of(m.transfer[ADAPTIVE_LAMBDA])
      rows.append([m.name, m.transfer[ADAPTIVE_LAMBDA]['attack'],
                   "the paper's FGSM, crafted on the undefended model", f.text(), f.n])
    for r in m.adaptive:
      rows.append([m.name, r['attack'], r.get('threat', '—'), frame.Measure.of(r).text(), r['n']])
    w, how = m.worst()
    rows.append([m.name, f'**worst case** ({how})', 'all of the above', f'**{w.text()}**', w.n])
  if not rows:
    return 'No adaptive run has finished.\n'
  return reporting.format_table(rows, ['model', 'attack at 8/255', 'threat', 'accuracy [95% CI]',
                                       'n'])


def _calibration_table(models: dict[str, Model]) -> str:
  lams = sorted({lam for m in models.values() for lam in m.fgsm})
  rows = []
  for m in models.values():
    if m.clean is None:
      continue
    fmt = lambda v: '—' if v is None else f'{v:.3f}'
    rows.append([m.name, fmt(_ece(m.clean)), fmt(m.clean.get('nll'))]
                + [fmt(_ece(m.fgsm.get(lam))) for lam in lams])
  if not rows:
    return ''
  return reporting.format_table(rows, ['model', 'ECE clean', 'NLL clean']
                                + [f'ECE λ = {lam}' for lam in lams])


def _departures(runs: frame.RunSet) -> list[str]:
  out = []
  train = runs.get('dense')
  t = train.config.train if train else None
  if train:
    data = train.config.data
    sizes = estimates.DATA_SIZES.get(data.name, (data.fake_num_train, data.fake_num_test))
    out.append(f'Data: `{data.source}:{data.name}`, {sizes[0]:,} training / {sizes[1]:,} test '
               'images (paper: CIFAR-10, 50,000 / 10,000).')
    shape = tuple(data.fake_shape) if data.source == 'fake' else (32, 32, 3)
    aug = t.augment
    augment = ' with ' + ' and '.join(
        ([f'pad-{aug.crop_padding} crops'] if aug.crop_padding else [])
        + (['flips'] if aug.flip else [])) if aug.crop_padding or aug.flip else ''
    out.append(f'Model: `{train.config.model.name}` (paper: ResNet-20, pre-activation, input '
               f'BatchNorm); {shape[0]}×{shape[1]} inputs{augment} (paper: 28×28 crops with '
               'HSL jitter).')
    schedule = (f'×{t.decay_factor} at epochs {", ".join(f"{b:g}" for b in t.boundaries)}'
                if t.schedule == 'piecewise' else f'{t.schedule} schedule')
    out.append(f'Training: {t.num_epochs} epochs, batch {t.batch_size}, {t.optimizer} lr '
               f'{t.learning_rate} ({schedule}) (paper: 150 epochs, batch 512, SGD lr 0.5, ×0.1 '
               'at 100 and 130).')
  fgsm = next((r for r in runs.runs if 'fgsm' in r.experiment.attacks), None)
  if fgsm:
    e = fgsm.config.eval
    out.append(f"Paper's protocol: FGSM on the mean of {e.eot_samples} sampled input gradients "
               f'and predictions as the mean softmax of {e.num_draws} draws (paper: 100 and '
               f'100), on the first {e.num_attack_examples or "all"} test images (paper: the '
               'whole test set); λ/255 in [0, 1] pixels, clipped to [0, 1] (the paper clips '
               'to [0, 255]). The suite also runs the same FGSM crafted on the undefended '
               'model (a transfer row).')
  adaptive = [r for r in runs.runs if any(a != 'fgsm' for a in r.experiment.attacks)]
  if adaptive:
    e = adaptive[0].config.eval
    specs = sorted({a for r in adaptive for a in r.experiment.attacks if a != 'fgsm'})
    out.append(f'Adaptive suite at 8/255 on the first {e.num_attack_examples} test images: '
               f'{", ".join(f"`{s}`" for s in specs)}, with EOT over {e.eot_samples} draws '
               f'per gradient for SAP (AutoAttack-rand brings its own 20), scored with '
               f'{e.num_draws} fresh draws; BPDA = `sap(..., gradient=identity)`, the same '
               'forward pass with the identity as backward pass.')
  out.append('SAP: exact sampling with replacement, after every ReLU, gradient through the '
             'mask only (the authors\' MXNet operator); no fine-tuning.')
  out.append('No hyperparameter was chosen on the test images: the schedule is the paper\'s '
             'shape shortened to the budget, fixed before any run.')
  return out


def _not_run(runs: frame.RunSet) -> list[str]:
  names = {r.experiment.name for r in runs.runs}
  out = []
  if 'adv' not in names:
    out.append('The ADV model and ADV+SAP (a second training run; full scale only).')
  if not any('autoattack_rand' in a for r in runs.runs for a in r.experiment.attacks):
    out.append('AutoAttack-rand (2 × steps × 20 EOT draws per example: full scale only).')
  with_bpda = {model_name(r.experiment.model, config_utils.spec_name(d))
               for r in runs.runs for d in r.experiment.defenses}
  missing = [k for k in (10, 20, 50, 100) if (f'SAP-{k}', True) not in with_bpda]
  if missing:
    out.append(f'BPDA for SAP-{", SAP-".join(map(str, missing))} (cost).')
  out.append('The RNA / RSA / test-time-dropout baselines at matched clean accuracy (their '
             'noise scales would be chosen on a validation split of the training data; '
             '`noise(sigma, placement=act)` is RNA, RSA and dropout have no defense spec yet).')
  out.append("The paper's iterative attack (its parameters are not available in the sources) "
             'and its reinforcement-learning experiments.')
  older = [r.experiment.name for r in runs.finished('adaptive')
           if any(d != 'none' and 'identity' not in d for d in r.experiment.defenses)
           and not any(row['attack'].endswith('+bpda') for row in r.report['rows'])]
  if older:
    out.append(f'The suite\'s own BPDA row for SAP (its first iterative attack through the '
               f'identity mask gradient, with EOT) in {", ".join(older)}: those runs predate it '
               '(their estimates include it); SAP-100\'s BPDA is the separate bpda run.')
  unfinished = [r.experiment.name for r in runs.runs if r.report is None]
  if unfinished:
    out.append(f'Not finished yet: {", ".join(unfinished)}.')
  return out


# ----------------------------------------------------------------------------------------
# Figures.


def accuracy_vs_lambda_figure(models: dict[str, Model]):
  """Accuracy (with 95% bands) against lambda under the paper's FGSM, one line per model;
  the adaptive worst case at 8/255 as a cross."""
  drawn = [m for m in models.values() if m.fgsm]
  if not drawn:
    return None
  lams = sorted({0, *(lam for m in drawn for lam in m.fgsm)})
  pos = {lam: i for i, lam in enumerate(lams)}
  fig, ax = frame.accuracy_figure(4.2)
  styles = plots.style_map(m.name for m in drawn)
  for m in drawn:
    points = dict(m.fgsm)
    if m.clean is not None:
      points[0] = m.clean
    xs = sorted(points)
    acc = [points[x]['accuracy'] for x in xs]
    lo = [(points[x].get('ci95') or [a, a])[0] for x, a in zip(xs, acc)]
    hi = [(points[x].get('ci95') or [a, a])[1] for x, a in zip(xs, acc)]
    x = [pos[v] for v in xs]
    style = styles[m.name]
    ax.plot(x, acc, label=m.name, markersize=4, **style)
    ax.fill_between(x, lo, hi, color=style['color'], alpha=0.12, linewidth=0)
    w = m.worst()[0]
    if w is not None and ADAPTIVE_LAMBDA in pos:
      ax.plot([pos[ADAPTIVE_LAMBDA] + 0.12], [w.accuracy], marker='X', markersize=9,
              linestyle='none', color=style['color'], markeredgecolor='black',
              label=f'{m.name}: adaptive worst case, 8/255')
  ax.set_xticks(range(len(lams)), [str(v) for v in lams])
  return frame.finish_accuracy_figure(fig, ax, "FGSM λ (0-255 pixel units; the paper's protocol)")


# ----------------------------------------------------------------------------------------
# The section.


def render(runs: frame.RunSet, figures_dir: str) -> frame.Section:
  """The SAP section of RESULTS.md and its figures (accuracy_vs_lambda.png,
  reliability.png), linked relative to RESULTS.md through `figures_dir`."""
  models = gather(runs)
  clean_rows = [dict(m.clean, defense=m.name) for m in models.values() if m.clean is not None]
  figures = {'accuracy_vs_lambda.png': frame.png(accuracy_vs_lambda_figure(models)),
             'reliability.png': plots.reliability(clean_rows)}
  finished = len(runs.finished())
  cmd = f'python scripts/reproduce.py --paper=sap --scale={runs.scale} --root=DIR'
  out = [f'## {runs.paper.title}: scale `{runs.scale}`', '',
         f'Stochastic Activation Pruning on a pre-trained ResNet-20, under the paper\'s FGSM '
         f'protocol and under advdef\'s adaptive suite. `{cmd}` ({finished} of '
         f'{len(runs.runs)} experiments finished; configs/repro_sap.py). Sources: '
         f'../shared/reference/{PAPER} §1 and {ADAPTIVE_DOC} §1, §3.1.', '',
         f'**{frame.SCALE_NOTE[runs.scale]}**', '',
         '### Claims', '',
         reporting.format_table(claims(models, runs.scale),
                                ['claim', 'source', "paper's number",
                                 "advdef, paper's protocol", 'advdef, adaptive (worst case)',
                                 'n', 'verdict']),
         'Departures from the paper at this scale:', '',
         *[f'- {d}' for d in _departures(runs)], '',
         f'Comparisons are made at λ = {ADAPTIVE_LAMBDA} (= 8/255, the adaptive suite\'s '
         'budget), chosen before the runs; the tables below give every λ.', '',
         frame.VERDICT_RULES, '']
  if figures['accuracy_vs_lambda.png']:
    out += [f'![accuracy against FGSM lambda]({figures_dir}/accuracy_vs_lambda.png)', '']
  out += ["### The paper's protocol: accuracy under FGSM", '', _fgsm_table(models),
          '### The adaptive suite at 8/255', '', _adaptive_table(models),
          '### Calibration', '', 'ECE (15 bins) and NLL of the mean-softmax prediction, clean '
          "and under the paper's FGSM.", '', _calibration_table(models)]
  if figures['reliability.png']:
    out += [f'![reliability diagrams, clean]({figures_dir}/reliability.png)', '']
  out += ['### Not run at this scale', '', *[f'- {n}' for n in _not_run(runs)], '',
          '### Run time', '', frame.timing_table(runs)]
  return frame.Section('\n'.join(out), figures)
