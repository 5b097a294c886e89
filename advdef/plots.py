"""Plots of reports and training runs, rendered to PNG in memory.

advdef.reporting.write_report draws the report's plots with `accuracy_vs_epsilon`,
`reliability` and `sweep` (each returns PNG bytes, or None when there is nothing to draw),
and writes them beside report.json. `training_curves` plots the metrics.jsonl rows of a run
and writes the PNG itself (atomically, through advdef.files). Each has a `*_figure` twin
that returns the matplotlib Figure instead, for tests and notebooks.

Layout rules shared by the plots: at most 4 panels per row, panels share their axes, one
legend per figure placed outside every panel (a legend inside covers curves), one fixed
colour and marker per attack or metric across all panels, accuracy shown in percent.

The functions take rows already validated by advdef.reporting and converted to plain JSON
(numbers are Python floats or None). Matplotlib is imported lazily and used through
`matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so drawing neither
needs a display nor changes the global backend of a notebook that imports this module.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from advdef import files

# Norm names as drawn, in panel order; unknown norms come last, drawn by name.
_NORM_TITLES = {'linf': r'$\ell_\infty$', 'l2': r'$\ell_2$'}
_MAX_COLUMNS = 4
# Panel size in inches; the legend gets its own column on the right.
_PANEL_W, _PANEL_H = 3.4, 2.9
_LEGEND_W = 2.4
# Markers cycle with the colours, so attacks stay apart in grey-scale prints too.
_MARKERS = ('o', 's', '^', 'v', 'D', 'P', 'X', '<', '>', 'h')
_ATTACK_LW, _WORST_LW = 1.2, 3.2
# Fixed colours of the quantities that are not attacks.
_WORST_COLOR = 'black'
_CLEAN_COLOR = 'tab:blue'
_ROBUST_COLOR = 'tab:red'
_DIAGONAL_COLOR = 'tab:gray'

WORST_CASE_LABEL = 'worst case'  # Every worst-case line's label starts with this.
_WORST_CI_LABEL = '95% CI of the worst case'


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _norm_order(norm: str) -> int:
  return list(_NORM_TITLES).index(norm) if norm in _NORM_TITLES else len(_NORM_TITLES)


def _new_figure(width: float, height: float):
  """A Figure of `width` x `height` inches at 100 dpi, 'constrained' layout, Agg canvas."""
  # Lazy: matplotlib costs ~0.5 s to import.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)  # Attached per figure, so fig.canvas.draw() works without pyplot.
  return fig


def _png_bytes(fig) -> bytes:
  buf = io.BytesIO()
  # 'tight' keeps anything drawn outside the panels (the legend, long titles) in the PNG.
  fig.savefig(buf, format='png', bbox_inches='tight', pad_inches=0.1)
  return buf.getvalue()


def _png_or_none(fig) -> bytes | None:
  return None if fig is None else _png_bytes(fig)


def style_map(names: Iterable[str]) -> dict[str, dict[str, Any]]:
  """One fixed line style per name (colour, marker, linestyle), by sorted name.

  Colours come from tab10 (tab20 past 10 names); past 20 they repeat with dashed lines.
  """
  from matplotlib import colormaps
  names = sorted(set(names))
  colors = colormaps['tab10' if len(names) <= 10 else 'tab20'].colors
  return {name: {'color': colors[i % len(colors)], 'marker': _MARKERS[i % len(_MARKERS)],
                 'linestyle': '-' if i < len(colors) else '--'}
          for i, name in enumerate(names)}


def _grid(fig, n: int, *, sharex: bool = True):
  """`n` panels, at most 4 per row, sharing both axes; inner y tick labels hidden."""
  ncols = min(_MAX_COLUMNS, n)
  gs = fig.add_gridspec(math.ceil(n / ncols), ncols)
  axes = []
  for i in range(n):
    ax = fig.add_subplot(gs[i // ncols, i % ncols], sharey=axes[0] if axes else None,
                         sharex=axes[0] if axes and sharex else None)
    if i % ncols:
      ax.tick_params(labelleft=False)
    axes.append(ax)
  return axes


def _percent_axis(axis) -> None:
  """A fraction in [0, 1] on `axis` (ax.xaxis, ax.yaxis) drawn as 0%..100%, as report.md."""
  from matplotlib.ticker import PercentFormatter
  axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def _figure_legend(fig, axes, first_labels: Sequence[str] = ()) -> None:
  """One legend for the figure, right of the panels; each label once, `first_labels` first.

  'outside' makes the constrained layout reserve room for it, so it never covers a panel.
  """
  handles: dict[str, Any] = {}
  for ax in axes:
    for h, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, h)
  if not handles:
    return
  order = [l for l in first_labels if l in handles] + sorted(
      l for l in handles if l not in first_labels)
  fig.legend([handles[l] for l in order], order, loc='outside right upper', fontsize=8,
             ncols=1 if len(order) <= 16 else 2, frameon=False)


# ----------------------------------------------------------------------------
# Accuracy against epsilon.


def _epsilon_panels(clean_rows, attacked_rows):
  """{(norm, defense): {'attacks': {attack: {eps: row}}, 'worst': {eps: row}}}, in order.

  Panels are ordered by norm, then by the defense's first appearance in the report (the
  config's order); rows without a norm or epsilon (minimum-norm attacks) are left out.
  """
  order = list(dict.fromkeys([r['defense'] for r in clean_rows] +
                             [r['defense'] for r in attacked_rows]))
  panels: dict[tuple[str, str], dict[str, dict]] = {}
  for r in attacked_rows:
    if r['norm'] is None or r['epsilon'] is None:
      continue
    panel = panels.setdefault((r['norm'], r['defense']), {'attacks': {}, 'worst': {}})
    eps = float(r['epsilon'])
    if r.get('worst_case'):
      panel['worst'][eps] = r
    else:
      panel['attacks'].setdefault(r['attack'], {})[eps] = r
  keys = sorted(panels, key=lambda k: (_norm_order(k[0]), k[0], order.index(k[1])))
  return {k: panels[k] for k in keys}


def _worst_curve(panel):
  """[(eps, accuracy, ci95)] of the worst case over attacks, and its legend label.

  The report's worst-case rows are per-example (an example counts only if every attack
  failed on it) and are used where present; the report has none where a single attack ran,
  and there that attack's accuracy is the worst case. Elsewhere the curve falls back to the
  minimum over attacks, an upper bound on the per-example worst case, and says so.
  """
  points, kinds = [], set()
  for eps in sorted(set(panel['worst']).union(*map(set, panel['attacks'].values()))):
    if eps in panel['worst']:
      row, kind = panel['worst'][eps], 'per-example'
    else:
      rows = [by_eps[eps] for by_eps in panel['attacks'].values() if eps in by_eps]
      row = min(rows, key=lambda r: r['accuracy'])
      kind = 'single' if len(rows) == 1 else 'min'
    points.append((eps, float(row['accuracy']), row['ci95']))
    kinds.add(kind)
  if kinds == {'single'}:
    detail = 'single attack'
  elif 'min' not in kinds:
    detail = 'per-example'
  elif 'per-example' not in kinds:
    detail = 'min over attacks'
  else:
    detail = 'per-example, else min over attacks'
  return points, f'{WORST_CASE_LABEL} ({detail})'


def _with_clean(eps, acc, clean):
  # Curves start at the clean accuracy (epsilon 0) so the drop at the first epsilon shows.
  if clean is not None and eps and eps[0] > 0:
    return [0.0] + eps, [float(clean)] + acc
  return eps, acc


def accuracy_vs_epsilon_figure(clean_rows: Sequence[Mapping[str, Any]],
                               attacked_rows: Sequence[Mapping[str, Any]]):
  """The Figure of `accuracy_vs_epsilon`, or None when there is nothing to draw."""
  panels = _epsilon_panels(clean_rows, attacked_rows)
  if not panels:
    return None
  clean_by_defense = {r['defense']: r['accuracy'] for r in clean_rows}
  styles = style_map(a for p in panels.values() for a in p['attacks'])
  norms = list(dict.fromkeys(norm for norm, _ in panels))
  ncols = min(_MAX_COLUMNS, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  fig = _new_figure(_PANEL_W * ncols + _LEGEND_W, _PANEL_H * nrows + 0.6)
  # Epsilons of different norms are not comparable: share x only within a norm.
  axes = _grid(fig, len(panels), sharex=len(norms) == 1)
  worst_labels = []
  for ax, ((norm, defense), panel) in zip(axes, panels.items()):
    clean = clean_by_defense.get(defense)
    points, worst_label = _worst_curve(panel)
    worst_labels.append(worst_label)
    eps, acc = _with_clean([p[0] for p in points], [p[1] for p in points], clean)
    # Drawn under the attacks (zorder): a thin line inside the thick one shows which
    # attack attains the worst case.
    ax.plot(eps, acc, color=_WORST_COLOR, linewidth=_WORST_LW, alpha=0.85, zorder=2,
            solid_capstyle='round', label=worst_label)
    # Where the curve is a minimum over attacks, the band is that attack's interval.
    band = [(e, ci[0], ci[1]) for e, _, ci in points if ci is not None]
    if band:
      ax.fill_between(*zip(*band), color=_WORST_COLOR, alpha=0.12, linewidth=0, zorder=1,
                      label=_WORST_CI_LABEL)
    # No bands for the attacks: one per attack would hide the lines; report.md has them.
    for attack in sorted(panel['attacks']):
      by_eps = panel['attacks'][attack]
      e_sorted = sorted(by_eps)
      eps, acc = _with_clean(e_sorted, [float(by_eps[e]['accuracy']) for e in e_sorted], clean)
      ax.plot(eps, acc, linewidth=_ATTACK_LW, markersize=4, zorder=3, label=attack,
              **styles[attack])
    ax.set_title(defense if len(norms) == 1 else f'{defense} ({_NORM_TITLES.get(norm, norm)})',
                 fontsize=10)
    if len(norms) > 1:
      ax.set_xlabel(f'ε ({_NORM_TITLES.get(norm, norm)}, [0, 1] pixel scale)')
    ax.set_ylim(-0.02, 1.02)
    _percent_axis(ax.yaxis)
    ax.grid(alpha=0.3)
  if len(norms) == 1:
    fig.supxlabel(f'ε ({_NORM_TITLES.get(norms[0], norms[0])} norm, [0, 1] pixel scale)',
                  fontsize=10)
  fig.supylabel('accuracy', fontsize=10)
  _figure_legend(fig, axes, first_labels=list(dict.fromkeys(worst_labels)) +
                 [_WORST_CI_LABEL])
  return fig


def accuracy_vs_epsilon(clean_rows: Sequence[Mapping[str, Any]],
                        attacked_rows: Sequence[Mapping[str, Any]]) -> bytes | None:
  """Accuracy against epsilon: one panel per defense (and norm), one line per attack.

  Each panel draws the worst case over attacks thick and black, with its 95% interval,
  and each attack thin, in one colour per attack across panels; curves start at the
  defense's clean accuracy at epsilon 0. The legend is shared, right of the panels.

  Args:
    clean_rows: the report's clean rows; a curve starts at its defense's clean accuracy.
    attacked_rows: attacked and worst-case rows (those with 'worst_case' True are the
      per-example worst case; without them the minimum over attacks is drawn, and the
      legend says which); rows without a norm or epsilon are skipped.

  Returns:
    PNG bytes, or None when no row has both a norm and an epsilon.
  """
  return _png_or_none(accuracy_vs_epsilon_figure(clean_rows, attacked_rows))


# ----------------------------------------------------------------------------
# Calibration and sweeps.


def reliability_figure(clean_rows: Sequence[Mapping[str, Any]]):
  """The Figure of `reliability`, or None when no row carries 'calibration_bins'."""
  with_bins = [r for r in clean_rows if r.get('calibration_bins')]
  if not with_bins:
    return None
  ncols = min(_MAX_COLUMNS, len(with_bins))
  nrows = math.ceil(len(with_bins) / ncols)
  fig = _new_figure(3.2 * ncols + _LEGEND_W, 3.0 * nrows + 0.6)
  axes = _grid(fig, len(with_bins))
  for ax, r in zip(axes, with_bins):
    bins = r['calibration_bins']
    conf = np.asarray(bins['confidence'], dtype=float)
    acc = np.asarray(bins['accuracy'], dtype=float)
    count = np.asarray(bins['count'], dtype=float)
    keep = count > 0  # Empty bins carry no information (and often NaN accuracy).
    width = 1.0 / max(len(conf), 1)
    ax.bar(conf[keep], acc[keep], width=width * 0.9, color=_CLEAN_COLOR, alpha=0.7,
           edgecolor='black', linewidth=0.5, label='accuracy in bin')
    ax.plot([0, 1], [0, 1], linestyle='--', color=_DIAGONAL_COLOR,
            label='perfect calibration')
    ece = r.get('ece')
    ece_text = f'\nECE {float(ece):.4f}' if _is_number(ece) and math.isfinite(float(ece)) else ''
    ax.set_title(f"{r['defense']}{ece_text}", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _percent_axis(ax.xaxis)
    _percent_axis(ax.yaxis)
    ax.grid(alpha=0.3)
  fig.supxlabel('confidence (top-class probability)', fontsize=10)
  fig.supylabel('accuracy', fontsize=10)
  _figure_legend(fig, axes, first_labels=['accuracy in bin', 'perfect calibration'])
  return fig


def reliability(clean_rows: Sequence[Mapping[str, Any]]) -> bytes | None:
  """Reliability diagrams (accuracy per confidence bin), one panel per clean row.

  Args:
    clean_rows: the report's clean rows; those with 'calibration_bins' are drawn.

  Returns:
    PNG bytes, or None when no row carries 'calibration_bins'.
  """
  return _png_or_none(reliability_figure(clean_rows))


def sweep_figure(sweep_entry: Mapping[str, Any]):
  """The Figure of `sweep`."""
  values = list(sweep_entry['values'])
  numeric = all(_is_number(v) for v in values)
  xs = [float(v) for v in values] if numeric else list(range(len(values)))
  fig = _new_figure(4.5 + _LEGEND_W, 3.6)
  ax = fig.subplots()
  robust_label = (f"robust: {sweep_entry['attack']}\nat ε = {float(sweep_entry['epsilon']):.4g} "
                  '([0, 1] pixels)')
  for key, label, color, marker in (
      ('clean_accuracy', 'clean', _CLEAN_COLOR, 'o'),
      ('robust_accuracy', robust_label, _ROBUST_COLOR, 's')):
    # NaN leaves a gap in the line.
    ys = [np.nan if v is None else float(v) for v in sweep_entry[key]]
    ax.plot(xs, ys, color=color, marker=marker, markersize=5, linewidth=1.5, label=label)
  param = sweep_entry['param']
  if not numeric:
    ax.set_xticks(xs, [str(v) for v in values])
  elif len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 100:
    ax.set_xscale('log')  # Hyperparameters spanning decades read better on a log axis.
    param += ' (log scale)'
  ax.set_xlabel(param)
  ax.set_ylabel('accuracy')
  ax.set_ylim(-0.02, 1.02)
  _percent_axis(ax.yaxis)
  ax.set_title(f"{sweep_entry['defense']}: accuracy against {sweep_entry['param']}",
               fontsize=10)
  ax.grid(alpha=0.3)
  _figure_legend(fig, [ax], first_labels=['clean', robust_label])
  return fig


def sweep(sweep_entry: Mapping[str, Any]) -> bytes:
  """Clean and robust accuracy against one defense hyperparameter.

  Args:
    sweep_entry: one entry of the report's 'sweeps'; None accuracies leave gaps. Numeric
      values spanning more than two decades get a log axis; others are categories.

  Returns:
    PNG bytes.
  """
  return _png_bytes(sweep_figure(sweep_entry))


# ----------------------------------------------------------------------------
# Training curves.


def training_curves_figure(metrics_rows: Sequence[Mapping[str, Any]]):
  """The Figure of `training_curves`; raises ValueError as it does."""
  keys = sorted({k for r in metrics_rows for k in r if k not in ('step', 'time')})
  panels = [('loss', [k for k in keys if 'loss' in k.lower()]),
            ('accuracy', [k for k in keys if 'acc' in k.lower()])]
  panels = [(title, ks) for title, ks in panels if ks]
  if not panels:
    raise ValueError(f'training_curves: no loss or accuracy metrics among keys {keys}; '
                     "expected names containing 'loss' or 'acc'.")
  styles = style_map(k for _, ks in panels for k in ks)
  fig = _new_figure(5.0 * len(panels), 4.2)
  axes = fig.subplots(1, len(panels), squeeze=False, sharex=True)[0]
  for ax, (title, panel_keys) in zip(axes, panels):
    for key in panel_keys:
      points = [(r['step'], r[key]) for r in metrics_rows
                if _is_number(r.get(key)) and 'step' in r]
      if points:
        style = dict(styles[key], marker=styles[key]['marker'] if len(points) < 30 else None)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key, markersize=3,
                **style)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('step (optimizer updates)')
    ax.set_ylabel(title)
    if title == 'loss' and all(r[k] > 0 for r in metrics_rows for k in panel_keys
                               if _is_number(r.get(k))):
      # Losses shrink by orders of magnitude; a log axis keeps the tail visible.
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    # The panels hold different metrics, so each gets its legend, below it (not on curves).
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.18), ncols=2,
                frameon=False)
  return fig


def training_curves(metrics_rows: Sequence[Mapping[str, Any]], path: os.PathLike | str
                    ) -> pathlib.Path:
  """Plots loss and accuracy against step from metrics.jsonl rows.

  Every key whose name contains 'loss' goes in the left panel, every key
  containing 'acc' in the right one (e.g. 'train/loss', 'test/accuracy'). Rows
  lacking a key, or holding null for it, are skipped for that key only.

  Args:
    metrics_rows: dicts with a 'step' key, as from
      `advdef.metric_writers.read_metrics`.
    path: the PNG to write (atomically).

  Returns:
    The path written.

  Raises:
    ValueError: if no row holds a loss or accuracy metric.
  """
  return files.write_bytes_atomic(path, _png_bytes(training_curves_figure(metrics_rows)))
