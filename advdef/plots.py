"""Plots of reports and training runs, rendered to PNG in memory.

advdef.reporting.write_report draws the report's plots with `accuracy_vs_epsilon`,
`reliability` and `sweep` (each returns PNG bytes, or None when there is nothing to draw),
and writes them beside report.json. `training_curves` plots the metrics.jsonl rows of a run
and writes the PNG itself (atomically, through advdef.files).

The functions take rows already validated by advdef.reporting and converted to plain JSON
(numbers are Python floats or None). Matplotlib is imported lazily and used through
`matplotlib.figure.Figure` directly (Agg canvas), never through pyplot, so drawing neither
needs a display nor changes the global backend of a notebook that imports this module.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from advdef import files

# Panel titles per norm, in panel order; unknown norms come last, titled by name.
_NORM_TITLES = {'linf': r'$\ell_\infty$', 'l2': r'$\ell_2$'}


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _norm_order(norm: str) -> int:
  return list(_NORM_TITLES).index(norm) if norm in _NORM_TITLES else len(_NORM_TITLES)


def _new_figure(width: float, height: float):
  """A Figure of `width` x `height` inches at 100 dpi, laid out with 'constrained'."""
  from matplotlib.figure import Figure  # Lazy: matplotlib costs ~0.5 s to import.
  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _png_bytes(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()


def accuracy_vs_epsilon(clean_rows: Sequence[Mapping[str, Any]],
                        attacked_rows: Sequence[Mapping[str, Any]]) -> bytes | None:
  """Accuracy against epsilon, one panel per norm, one curve per defense and attack.

  Args:
    clean_rows: the report's clean rows; a curve starts at its defense's clean accuracy.
    attacked_rows: attacked and worst-case rows (those with 'worst_case' True are drawn
      thick and black); rows without a norm or epsilon are skipped.

  Returns:
    PNG bytes, or None when no row has both a norm and an epsilon.
  """
  curves = [r for r in attacked_rows if r['norm'] is not None and r['epsilon'] is not None]
  if not curves:
    return None
  norms = sorted({r['norm'] for r in curves}, key=_norm_order)
  clean_by_defense = {r['defense']: r['accuracy'] for r in clean_rows}
  fig = _new_figure(6.0 * len(norms), 4.5)
  axes = fig.subplots(1, len(norms), squeeze=False)[0]
  for ax, norm in zip(axes, norms):
    groups: dict[tuple[str, str, bool], list[Mapping[str, Any]]] = {}
    for r in curves:
      if r['norm'] == norm:
        groups.setdefault((r['defense'], r['attack'], bool(r.get('worst_case'))), []).append(r)
    for (defense, attack, is_worst), group in sorted(groups.items()):
      group = sorted(group, key=lambda r: r['epsilon'])
      eps = [float(r['epsilon']) for r in group]
      acc = [float(r['accuracy']) for r in group]
      lo = [float(r['ci95'][0]) if r['ci95'] else a for r, a in zip(group, acc)]
      hi = [float(r['ci95'][1]) if r['ci95'] else a for r, a in zip(group, acc)]
      # Curves start at the clean accuracy so the drop at the first epsilon is visible.
      if eps[0] > 0 and defense in clean_by_defense:
        eps, acc = [0.0] + eps, [clean_by_defense[defense]] + acc
        lo, hi = [None] + lo, [None] + hi
      label = f'{defense}: worst case' if is_worst else f'{defense}: {attack}'
      line, = ax.plot(eps, acc, marker='o', markersize=4, label=label,
                      linewidth=3.0 if is_worst else 1.3, color='black' if is_worst else None)
      band = [(e, l, h) for e, l, h in zip(eps, lo, hi) if l is not None]
      if band:
        ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_title(_NORM_TITLES.get(norm, norm))
    ax.set_xlabel('epsilon')
    ax.set_ylabel('accuracy')
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _png_bytes(fig)


def reliability(clean_rows: Sequence[Mapping[str, Any]]) -> bytes | None:
  """Reliability diagrams (accuracy per confidence bin), one panel per clean row.

  Args:
    clean_rows: the report's clean rows; those with 'calibration_bins' are drawn.

  Returns:
    PNG bytes, or None when no row carries 'calibration_bins'.
  """
  with_bins = [r for r in clean_rows if r.get('calibration_bins')]
  if not with_bins:
    return None
  fig = _new_figure(4.0 * len(with_bins), 4.0)
  axes = fig.subplots(1, len(with_bins), squeeze=False)[0]
  for ax, r in zip(axes, with_bins):
    bins = r['calibration_bins']
    conf = np.asarray(bins['confidence'], dtype=float)
    acc = np.asarray(bins['accuracy'], dtype=float)
    count = np.asarray(bins['count'], dtype=float)
    keep = count > 0  # Empty bins carry no information (and often NaN accuracy).
    width = 1.0 / max(len(conf), 1)
    ax.bar(conf[keep], acc[keep], width=width * 0.9, alpha=0.7, edgecolor='black',
           label='accuracy')
    ax.plot([0, 1], [0, 1], linestyle='--', color='gray', label='perfect calibration')
    ece = r.get('ece')
    ece_text = f', ECE {float(ece):.4f}' if _is_number(ece) and math.isfinite(float(ece)) else ''
    ax.set_title(f"{r['defense']}{ece_text}", fontsize=9)
    ax.set_xlabel('confidence')
    ax.set_ylabel('accuracy')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc='upper left')
  return _png_bytes(fig)


def sweep(sweep_entry: Mapping[str, Any]) -> bytes:
  """Clean and robust accuracy against one defense hyperparameter.

  Args:
    sweep_entry: one entry of the report's 'sweeps'; None accuracies leave gaps. Numeric
      values spanning more than two decades get a log axis; others are categories.

  Returns:
    PNG bytes.
  """
  values = list(sweep_entry['values'])
  numeric = all(_is_number(v) for v in values)
  xs = [float(v) for v in values] if numeric else list(range(len(values)))
  fig = _new_figure(5.5, 4.0)
  ax = fig.subplots()
  robust_label = f"robust ({sweep_entry['attack']}, ε={float(sweep_entry['epsilon']):.4g})"
  for key, label in (('clean_accuracy', 'clean'), ('robust_accuracy', robust_label)):
    # NaN leaves a gap in the line.
    ys = [np.nan if v is None else float(v) for v in sweep_entry[key]]
    ax.plot(xs, ys, marker='o', label=label)
  if not numeric:
    ax.set_xticks(xs, [str(v) for v in values])
  elif len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 100:
    ax.set_xscale('log')  # Hyperparameters spanning decades read better on a log axis.
  ax.set_xlabel(sweep_entry['param'])
  ax.set_ylabel('accuracy')
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{sweep_entry['defense']}: {sweep_entry['param']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _png_bytes(fig)


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
  keys = sorted({k for r in metrics_rows for k in r if k not in ('step', 'time')})
  panels = [('loss', [k for k in keys if 'loss' in k.lower()]),
            ('accuracy', [k for k in keys if 'acc' in k.lower()])]
  panels = [(title, ks) for title, ks in panels if ks]
  if not panels:
    raise ValueError(f'training_curves: no loss or accuracy metrics among keys {keys}; '
                     "expected names containing 'loss' or 'acc'.")
  fig = _new_figure(5.5 * len(panels), 4.0)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (title, panel_keys) in zip(axes, panels):
    for key in panel_keys:
      points = [(r['step'], r[key]) for r in metrics_rows
                if _is_number(r.get(key)) and 'step' in r]
      if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key,
                marker='o' if len(points) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel('step')
    if title == 'loss' and all(r[k] > 0 for r in metrics_rows for k in panel_keys
                               if _is_number(r.get(k))):
      # Losses shrink by orders of magnitude; a log axis keeps the tail visible.
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return files.write_bytes_atomic(path, _png_bytes(fig))
