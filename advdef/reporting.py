"""Evaluation reports: the report schema, its validation, and its JSON/Markdown/PNG renderings.

The evaluation code fills a plain dict (see `new_report` and the schema below);
`write_report` validates it and writes `report.json`, `report.md` and plots into
the run's workdir (atomically, through advdef.files).

Schema::

  report = {
    'advdef_version': str, 'created': ISO-8601 time,
    'config': dict (full config as plain JSON), 'dataset': str, 'model': str,
    'training': dict or None,
    'rows': [{'defense': str, 'attack': str ('none' for clean),
              'norm': 'linf' | 'l2' | None, 'epsilon': float | None,
              'accuracy': float in [0, 1], 'ci95': [lo, hi] | None, 'n': int,
              # Optional:
              'per_draw_accuracy', 'per_draw_ci95', 'num_draws',
              'nll', 'ece', 'brier', 'calibration_bins',
              'median_perturbation', 'median_relative_perturbation',
              'worst_case', 'attacks', 'seconds'}],
    'checks': [{'defense': str, 'name': str, 'status': 'pass'|'warn'|'fail',
                'detail': str}],
    'sweeps': [{'defense', 'param', 'values', 'clean_accuracy',
                'robust_accuracy', 'attack', 'epsilon'}],   # optional key
    'notes': [str],
  }

Non-finite floats (NaN, inf) are written to JSON as null, so every file stays
valid JSON that any reader accepts.

Matplotlib is imported lazily and used through `matplotlib.figure.Figure`
directly (Agg canvas), never through pyplot, so writing a report neither needs a
display nor changes the global backend of a notebook that imports this module.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from advdef import files

NORMS = ('linf', 'l2')
CHECK_STATUSES = ('pass', 'warn', 'fail')

_REQUIRED_REPORT_KEYS = ('advdef_version', 'created', 'config', 'dataset', 'model', 'training',
                         'rows', 'checks', 'notes')
_OPTIONAL_REPORT_KEYS = ('sweeps', 'wall_seconds', 'machine', 'model_summary')
_REQUIRED_ROW_KEYS = ('defense', 'attack', 'norm', 'epsilon', 'accuracy', 'ci95', 'n')
_OPTIONAL_ROW_KEYS = ('per_draw_accuracy', 'per_draw_ci95', 'num_draws', 'nll', 'ece', 'brier',
                      'calibration_bins', 'median_perturbation', 'median_relative_perturbation',
                      'worst_case', 'attacks', 'seconds', 'stochastic', 'threat', 'eot_samples',
                      'success_rate')
_CHECK_KEYS = ('defense', 'name', 'status', 'detail')
_SWEEP_KEYS = ('defense', 'param', 'values', 'clean_accuracy', 'robust_accuracy', 'attack',
               'epsilon')

# Marks an empty cell in Markdown tables; a dash reads better than 'None'.
_EMPTY = '—'


# ----------------------------------------------------------------------------
# Report construction and validation.


def new_report(*, config: Any, dataset: str, model: str, training: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
  """Returns an empty report with the version, creation time and config filled in."""
  from advdef import __version__  # Local import: advdef/__init__ imports nothing heavy, but keep it explicit.
  return {
      'advdef_version': __version__,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'config': files.to_jsonable(config),
      'dataset': dataset,
      'model': model,
      'training': None if training is None else dict(training),
      'rows': [],
      'checks': [],
      'sweeps': [],
      'notes': [],
  }


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_probability(x: Any) -> bool:
  return _is_number(x) and math.isfinite(float(x)) and 0.0 <= float(x) <= 1.0


def _is_interval(x: Any) -> bool:
  return (isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_probability(v) for v in x)
          and float(x[0]) <= float(x[1]))


def _row_label(i: int, row: Any) -> str:
  if not isinstance(row, Mapping):
    return f'rows[{i}]'
  return (f"rows[{i}] (defense {row.get('defense')!r}, attack {row.get('attack')!r}, "
          f"epsilon {row.get('epsilon')!r})")


def _validate_row(i: int, row: Any, problems: list[str]) -> None:
  where = _row_label(i, row)
  if not isinstance(row, Mapping):
    problems.append(f'{where}: must be a dict, got {type(row).__name__}')
    return
  missing = [k for k in _REQUIRED_ROW_KEYS if k not in row]
  if missing:
    problems.append(f'{where}: missing required key(s) {missing}')
  unknown = sorted(set(row) - set(_REQUIRED_ROW_KEYS) - set(_OPTIONAL_ROW_KEYS))
  if unknown:
    problems.append(f'{where}: unknown key(s) {unknown}; allowed optional keys are '
                    f'{list(_OPTIONAL_ROW_KEYS)}')
  for key in ('defense', 'attack'):
    if key in row and not (isinstance(row[key], str) and row[key]):
      problems.append(f'{where}: {key!r} must be a non-empty string, got {row[key]!r}')
  if 'norm' in row and row['norm'] not in (*NORMS, None):
    problems.append(f"{where}: 'norm' must be one of {list(NORMS)} or None, got {row['norm']!r}")
  if 'epsilon' in row and row['epsilon'] is not None and not (
      _is_number(row['epsilon']) and math.isfinite(float(row['epsilon'])) and row['epsilon'] >= 0):
    problems.append(f"{where}: 'epsilon' must be a finite number >= 0 or None, got {row['epsilon']!r}")
  if 'accuracy' in row and not _is_probability(row['accuracy']):
    problems.append(f"{where}: 'accuracy' must be a number in [0, 1], got {row['accuracy']!r}"
                    + (' (NaN or inf)' if row['accuracy'] is None else ''))
  if 'ci95' in row and row['ci95'] is not None and not _is_interval(row['ci95']):
    problems.append(f"{where}: 'ci95' must be [lo, hi] with 0 <= lo <= hi <= 1 or None, "
                    f"got {row['ci95']!r}")
  if 'n' in row and not (_is_int(row['n']) and row['n'] >= 0):
    problems.append(f"{where}: 'n' must be a non-negative int, got {row['n']!r}")
  if 'per_draw_accuracy' in row and not _is_probability(row['per_draw_accuracy']):
    problems.append(f"{where}: 'per_draw_accuracy' must be a number in [0, 1], "
                    f"got {row['per_draw_accuracy']!r}")
  if 'per_draw_ci95' in row and not _is_interval(row['per_draw_ci95']):
    problems.append(f"{where}: 'per_draw_ci95' must be [lo, hi] with 0 <= lo <= hi <= 1, "
                    f"got {row['per_draw_ci95']!r}")
  if 'num_draws' in row and not (_is_int(row['num_draws']) and row['num_draws'] >= 1):
    problems.append(f"{where}: 'num_draws' must be a positive int, got {row['num_draws']!r}")
  # NaN is allowed here (e.g. an NLL that overflowed); it is written as null.
  for key in ('nll', 'ece', 'brier', 'median_perturbation', 'median_relative_perturbation',
              'seconds'):
    if key in row and row[key] is not None and not _is_number(row[key]):
      problems.append(f'{where}: {key!r} must be a number or None, got {row[key]!r}')
  if 'worst_case' in row and not isinstance(row['worst_case'], (bool, np.bool_)):
    problems.append(f"{where}: 'worst_case' must be a bool, got {row['worst_case']!r}")
  if row.get('worst_case'):
    attacks = row.get('attacks')
    if not (isinstance(attacks, (list, tuple)) and attacks and all(isinstance(a, str) for a in attacks)):
      problems.append(f"{where}: a worst-case row needs 'attacks', the non-empty list of attack "
                      f'names it is the per-example minimum over, got {attacks!r}')
  elif 'attacks' in row:
    problems.append(f"{where}: 'attacks' is only meaningful with 'worst_case': True")
  if 'calibration_bins' in row:
    bins = row['calibration_bins']
    keys = ('confidence', 'accuracy', 'count')
    if not (isinstance(bins, Mapping) and all(k in bins for k in keys)):
      problems.append(f"{where}: 'calibration_bins' must be a dict with keys {list(keys)}")
    else:
      lengths = {k: len(bins[k]) for k in keys}
      if len(set(lengths.values())) != 1:
        problems.append(f"{where}: 'calibration_bins' lists must have equal lengths, got {lengths}")


def _validate_check(i: int, check: Any, problems: list[str]) -> None:
  where = f'checks[{i}]'
  if not isinstance(check, Mapping):
    problems.append(f'{where}: must be a dict, got {type(check).__name__}')
    return
  where = f"checks[{i}] ({check.get('defense')!r}, {check.get('name')!r})"
  missing = [k for k in _CHECK_KEYS if k not in check]
  if missing:
    problems.append(f'{where}: missing required key(s) {missing}')
  unknown = sorted(set(check) - set(_CHECK_KEYS))
  if unknown:
    problems.append(f'{where}: unknown key(s) {unknown}')
  for key in ('defense', 'name', 'detail'):
    if key in check and not isinstance(check[key], str):
      problems.append(f'{where}: {key!r} must be a string, got {check[key]!r}')
  if 'status' in check and check['status'] not in CHECK_STATUSES:
    problems.append(f"{where}: 'status' must be one of {list(CHECK_STATUSES)}, got {check['status']!r}")


def _validate_sweep(i: int, sweep: Any, problems: list[str]) -> None:
  where = f'sweeps[{i}]'
  if not isinstance(sweep, Mapping):
    problems.append(f'{where}: must be a dict, got {type(sweep).__name__}')
    return
  where = f"sweeps[{i}] ({sweep.get('defense')!r}, {sweep.get('param')!r})"
  missing = [k for k in _SWEEP_KEYS if k not in sweep]
  if missing:
    problems.append(f'{where}: missing required key(s) {missing}')
    return
  unknown = sorted(set(sweep) - set(_SWEEP_KEYS))
  if unknown:
    problems.append(f'{where}: unknown key(s) {unknown}')
  n = len(sweep['values'])
  for key in ('clean_accuracy', 'robust_accuracy'):
    values = sweep[key]
    if len(values) != n:
      problems.append(f"{where}: {key!r} has {len(values)} entries but 'values' has {n}")
    # None marks a setting that could not be evaluated; it is drawn as a gap.
    bad = [v for v in values if v is not None and not _is_probability(v)]
    if bad:
      problems.append(f'{where}: {key!r} entries must be numbers in [0, 1] or None, got {bad}')
  if not (_is_number(sweep['epsilon']) and math.isfinite(float(sweep['epsilon']))):
    problems.append(f"{where}: 'epsilon' must be a finite number, got {sweep['epsilon']!r}")


def validate_report(report: Any) -> None:
  """Checks `report` against the schema in the module docstring.

  Raises:
    ValueError: listing every problem found, one per line.
  """
  if not isinstance(report, Mapping):
    raise ValueError(f'report must be a dict, got {type(report).__name__}')
  try:
    # Validate the JSON form, so numpy/jax scalars pass exactly when they would be written.
    report = files.to_jsonable(report)
  except TypeError as e:
    raise ValueError(f'invalid report (nothing was written): {e}') from None
  problems: list[str] = []
  missing = [k for k in _REQUIRED_REPORT_KEYS if k not in report]
  if missing:
    problems.append(f'missing top-level key(s) {missing} (advdef.reporting.new_report fills them)')
  unknown = sorted(set(report) - set(_REQUIRED_REPORT_KEYS) - set(_OPTIONAL_REPORT_KEYS))
  if unknown:
    problems.append(f'unknown top-level key(s) {unknown}')
  for key in ('advdef_version', 'created', 'dataset', 'model'):
    if key in report and not isinstance(report[key], str):
      problems.append(f'{key!r} must be a string, got {report[key]!r}')
  if 'config' in report and not (isinstance(report['config'], Mapping)
                                 or hasattr(report['config'], 'to_dict')):
    problems.append(f"'config' must be a dict, got {type(report['config']).__name__}")
  if 'training' in report and not (report['training'] is None or isinstance(report['training'], Mapping)):
    problems.append(f"'training' must be a dict or None, got {type(report['training']).__name__}")
  for key, validate in (('rows', _validate_row), ('checks', _validate_check),
                        ('sweeps', _validate_sweep)):
    items = report.get(key, [])
    if not isinstance(items, (list, tuple)):
      problems.append(f'{key!r} must be a list, got {type(items).__name__}')
      continue
    for i, item in enumerate(items):
      validate(i, item, problems)
  notes = report.get('notes', [])
  if not (isinstance(notes, (list, tuple)) and all(isinstance(n, str) for n in notes)):
    problems.append(f"'notes' must be a list of strings, got {notes!r}")
  if problems:
    raise ValueError('invalid report (nothing was written):\n  - ' + '\n  - '.join(problems))


# ----------------------------------------------------------------------------
# Markdown.


def _escape_cell(text: str) -> str:
  # A raw '|' would end the cell and a newline would end the row.
  return text.replace('|', r'\|').replace('\r\n', '<br>').replace('\n', '<br>')


def _format_cell(value: Any) -> str:
  if value is None:
    return _EMPTY
  if isinstance(value, (bool, np.bool_)):
    return 'yes' if value else 'no'
  if _is_int(value):
    return str(int(value))
  if _is_number(value):
    value = float(value)
    return _EMPTY if math.isnan(value) else f'{value:.4g}'
  return _escape_cell(str(value))


def format_table(rows: Sequence[Sequence[Any] | Mapping[str, Any]], columns: Sequence[str]) -> str:
  """Formats a GitHub-flavoured Markdown table.

  Args:
    rows: each row is either a sequence of cells in column order or a mapping
      from column name to cell (missing names give empty cells).
    columns: the header names.

  Cells that are strings are used as they are (with '|' and newlines escaped);
  None and NaN become '—'; other numbers use 4 significant digits. Format
  numbers yourself first when you need a particular form.

  Returns:
    The table, one line per row, ending with a newline.
  """
  lines = ['| ' + ' | '.join(_escape_cell(str(c)) for c in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for row in rows:
    if isinstance(row, Mapping):
      cells = [row.get(c) for c in columns]
    else:
      cells = list(row)
      if len(cells) != len(columns):
        raise ValueError(f'format_table: a row has {len(cells)} cells but there are '
                         f'{len(columns)} columns ({list(columns)}): {cells!r}')
    lines.append('| ' + ' | '.join(_format_cell(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def _pct(x: Any) -> str:
  if x is None or (_is_number(x) and math.isnan(float(x))):
    return _EMPTY
  return f'{100.0 * float(x):.2f}%'


def _ci(interval: Any) -> str:
  if interval is None:
    return _EMPTY
  lo, hi = interval
  return f'[{100.0 * float(lo):.2f}, {100.0 * float(hi):.2f}]'


def _num(x: Any, spec: str) -> str:
  if x is None or (_is_number(x) and not math.isfinite(float(x))):
    return _EMPTY
  return format(float(x), spec)


def _eps(x: Any) -> str:
  return _EMPTY if x is None else f'{float(x):.4g}'


def _norm_key(norm: str | None) -> int:
  return NORMS.index(norm) if norm in NORMS else len(NORMS)


def _split_rows(rows: Sequence[Mapping[str, Any]]):
  clean = [r for r in rows if r['attack'] == 'none' and not r.get('worst_case')]
  worst = [r for r in rows if r.get('worst_case')]
  attacked = [r for r in rows if r['attack'] != 'none' and not r.get('worst_case')]
  return clean, attacked, worst


def _has(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
  return any(r.get(key) is not None for r in rows)


def _optional_columns(rows, spec):
  """Returns the (header, formatter) pairs of `spec` whose key some row has."""
  return [(header, fmt) for key, header, fmt in spec if _has(rows, key)]


_CALIBRATION_COLUMNS = (
    ('nll', 'NLL', lambda r: _num(r.get('nll'), '.4f')),
    ('ece', 'ECE', lambda r: _num(r.get('ece'), '.4f')),
    ('brier', 'Brier', lambda r: _num(r.get('brier'), '.4f')),
)
_DRAW_COLUMNS = (
    ('per_draw_accuracy', 'per-draw acc.', lambda r: _pct(r.get('per_draw_accuracy'))),
    ('per_draw_ci95', 'per-draw 95% CI', lambda r: _ci(r.get('per_draw_ci95'))),
    ('num_draws', 'draws', lambda r: _format_cell(r.get('num_draws'))),
)
_PERTURBATION_COLUMNS = (
    ('median_perturbation', 'median pert.', lambda r: _num(r.get('median_perturbation'), '.4g')),
    ('median_relative_perturbation', 'median rel. pert.',
     lambda r: _num(r.get('median_relative_perturbation'), '.4g')),
)
_SECONDS_COLUMNS = (('seconds', 'seconds', lambda r: _num(r.get('seconds'), '.1f')),)


def _table_with_optional(rows, fixed, optional_specs):
  optional = []
  for spec in optional_specs:
    optional += _optional_columns(rows, spec)
  headers = [h for h, _ in fixed] + [h for h, _ in optional]
  formatters = [f for _, f in fixed] + [f for _, f in optional]
  return format_table([[f(r) for f in formatters] for r in rows], headers)


def render_markdown(report: Mapping[str, Any]) -> str:
  """Renders a validated report as Markdown (the content of report.md)."""
  rows = list(report['rows'])
  clean, attacked, worst = _split_rows(rows)
  out = [f"# advdef report: {report['model']} on {report['dataset']}\n",
         f"Created {report['created']} with advdef {report['advdef_version']}.\n"]

  training = report.get('training')
  if training:
    out.append('## Training\n')
    flat = flatten_dict(training)
    out.append(format_table([[k, v] for k, v in flat.items()], ['quantity', 'value']))

  if clean:
    out.append('## Clean accuracy\n')
    fixed = [('defense', lambda r: r['defense']), ('accuracy', lambda r: _pct(r['accuracy'])),
             ('95% CI', lambda r: _ci(r['ci95'])), ('n', lambda r: str(r['n']))]
    out.append(_table_with_optional(clean, fixed, [_DRAW_COLUMNS, _CALIBRATION_COLUMNS,
                                                   _SECONDS_COLUMNS]))

  if attacked:
    out.append('## Robustness\n')
    attacked = sorted(attacked, key=lambda r: (r['defense'], r['attack'], _norm_key(r['norm']),
                                               -1.0 if r['epsilon'] is None else r['epsilon']))
    fixed = [('defense', lambda r: r['defense']), ('attack', lambda r: r['attack']),
             ('norm', lambda r: r['norm'] or _EMPTY), ('ε', lambda r: _eps(r['epsilon'])),
             ('accuracy', lambda r: _pct(r['accuracy'])), ('95% CI', lambda r: _ci(r['ci95'])),
             ('n', lambda r: str(r['n']))]
    out.append(_table_with_optional(attacked, fixed, [_DRAW_COLUMNS, _PERTURBATION_COLUMNS,
                                                      _CALIBRATION_COLUMNS, _SECONDS_COLUMNS]))

  if worst:
    out.append('## Worst case over attacks\n')
    out.append('Per-example minimum over the listed attacks: an example counts as robust only if '
               'every attack failed on it.\n')
    worst = sorted(worst, key=lambda r: (r['defense'], _norm_key(r['norm']),
                                         -1.0 if r['epsilon'] is None else r['epsilon']))
    fixed = [('defense', lambda r: r['defense']), ('norm', lambda r: r['norm'] or _EMPTY),
             ('ε', lambda r: _eps(r['epsilon'])), ('accuracy', lambda r: _pct(r['accuracy'])),
             ('95% CI', lambda r: _ci(r['ci95'])), ('n', lambda r: str(r['n'])),
             ('attacks', lambda r: ', '.join(r['attacks']))]
    out.append(_table_with_optional(worst, fixed, [_DRAW_COLUMNS]))

  if report['checks']:
    out.append('## Checks\n')
    counts = {s: sum(c['status'] == s for c in report['checks']) for s in CHECK_STATUSES}
    out.append(f"{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail.\n")
    # Failures first: they are what a reader must see.
    order = {'fail': 0, 'warn': 1, 'pass': 2}
    checks = sorted(report['checks'], key=lambda c: (order[c['status']], c['defense'], c['name']))
    status_text = {'pass': 'pass', 'warn': '**warn**', 'fail': '**FAIL**'}
    out.append(format_table([[c['defense'], c['name'], status_text[c['status']], c['detail']]
                             for c in checks], ['defense', 'check', 'status', 'detail']))

  if report.get('sweeps'):
    out.append('## Sweeps\n')
    for sweep in report['sweeps']:
      out.append(f"### {sweep['defense']}: {sweep['param']} "
                 f"(robust against {sweep['attack']} at ε = {_eps(sweep['epsilon'])})\n")
      out.append(format_table(
          [[_format_cell(v), _pct(c), _pct(r)] for v, c, r in
           zip(sweep['values'], sweep['clean_accuracy'], sweep['robust_accuracy'])],
          [sweep['param'], 'clean accuracy', 'robust accuracy']))

  summary = report.get('model_summary')
  if summary:
    out.append('## Model: sparsity, FLOPs, memory, vulnerability\n')
    out.append('Sparsity is the % of mask units pruned; FLOPs speed-up and memory % are '
               'counted as the ANP-VS code counts them; vulnerability is the mean '
               '|z(x) - z(x_adv)| over the activations.\n')
    flat = flatten_dict({k: v for k, v in summary.items() if k not in ('units', 'active_units')})
    out.append(format_table([[k, _format_cell(v)] for k, v in flat.items()],
                            ['quantity', 'value']))
    if summary.get('units'):
      out.append(format_table([[site, summary['active_units'][site], n]
                               for site, n in summary['units'].items()],
                              ['mask site', 'active units', 'units']))

  if report['notes']:
    out.append('## Notes\n')
    out.append(''.join(f'- {_escape_cell(n)}\n' for n in report['notes']))
  return '\n'.join(out)


def flatten_dict(tree: Any, *, sep: str = '.') -> dict[str, Any]:
  """Flattens nested mappings (and ConfigDicts) into {'a.b.c': leaf}.

  Lists and tuples are leaves, kept whole; an empty mapping is kept as {} so
  its key is not lost.
  """
  if hasattr(tree, 'to_dict') and callable(tree.to_dict):
    tree = tree.to_dict()
  flat: dict[str, Any] = {}

  def visit(prefix: str, node: Any) -> None:
    if hasattr(node, 'to_dict') and callable(node.to_dict):
      node = node.to_dict()
    if isinstance(node, Mapping) and node:
      for k, v in node.items():
        visit(f'{prefix}{sep}{k}' if prefix else str(k), v)
    else:
      flat[prefix] = node

  if not isinstance(tree, Mapping):
    raise TypeError(f'flatten_dict expects a dict or ConfigDict, got {type(tree).__name__}')
  for k, v in tree.items():
    visit(str(k), v)
  return flat


# ----------------------------------------------------------------------------
# Plots.


def _new_figure(width: float, height: float):
  from matplotlib.figure import Figure  # Lazy: matplotlib costs ~0.5 s to import.
  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _png_bytes(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()


def _plot_accuracy_vs_epsilon(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
  clean, attacked, worst = _split_rows(rows)
  curves = [r for r in attacked + worst if r['norm'] is not None and r['epsilon'] is not None]
  if not curves:
    return None
  norms = sorted({r['norm'] for r in curves}, key=_norm_key)
  clean_by_defense = {r['defense']: r['accuracy'] for r in clean}
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
        eps, acc, lo, hi = [0.0] + eps, [clean_by_defense[defense]] + acc, [None] + lo, [None] + hi
      label = f'{defense}: worst case' if is_worst else f'{defense}: {attack}'
      line, = ax.plot(eps, acc, marker='o', markersize=4, label=label,
                      linewidth=3.0 if is_worst else 1.3, color='black' if is_worst else None)
      band = [(e, l, h) for e, l, h in zip(eps, lo, hi) if l is not None]
      if band:
        ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_title({'linf': r'$\ell_\infty$', 'l2': r'$\ell_2$'}.get(norm, norm))
    ax.set_xlabel('epsilon')
    ax.set_ylabel('accuracy')
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _png_bytes(fig)


def _plot_reliability(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
  clean, _, _ = _split_rows(rows)
  with_bins = [r for r in clean if r.get('calibration_bins')]
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
    ax.bar(conf[keep], acc[keep], width=width * 0.9, alpha=0.7, edgecolor='black', label='accuracy')
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


def _plot_sweep(sweep: Mapping[str, Any]) -> bytes:
  values = list(sweep['values'])
  numeric = all(_is_number(v) for v in values)
  xs = [float(v) for v in values] if numeric else list(range(len(values)))
  fig = _new_figure(5.5, 4.0)
  ax = fig.subplots()
  for key, label in (('clean_accuracy', 'clean'),
                     ('robust_accuracy', f"robust ({sweep['attack']}, ε={_eps(sweep['epsilon'])})")):
    ys = [np.nan if v is None else float(v) for v in sweep[key]]  # NaN leaves a gap in the line.
    ax.plot(xs, ys, marker='o', label=label)
  if not numeric:
    ax.set_xticks(xs, [str(v) for v in values])
  elif len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 100:
    ax.set_xscale('log')  # Hyperparameters spanning decades read better on a log axis.
  ax.set_xlabel(sweep['param'])
  ax.set_ylabel('accuracy')
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{sweep['defense']}: {sweep['param']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _png_bytes(fig)


def _safe_filename_part(text: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(text))


def write_report(workdir: os.PathLike | str, report: Mapping[str, Any]) -> list[pathlib.Path]:
  """Validates `report` and writes report.json, report.md and the plots into `workdir`.

  Everything is rendered in memory first and each file is written atomically,
  with report.json last, so a failed validation or rendering leaves an earlier
  report untouched and a present report.json implies its companions were written.

  Written files: report.json, report.md, accuracy_vs_epsilon.png (when there
  are attacked rows with a norm and epsilon), reliability.png (when clean rows
  carry 'calibration_bins'), sweep_<defense>_<param>.png per sweep.

  Args:
    workdir: the run directory (created if needed).
    report: a dict following the schema in the module docstring.

  Returns:
    The paths written, report.json last.

  Raises:
    ValueError: if the report does not follow the schema (nothing is written).
  """
  validate_report(report)
  workdir = pathlib.Path(workdir)
  plain = files.to_jsonable(report)
  json_text = json.dumps(plain, indent=2, allow_nan=False) + '\n'
  markdown = render_markdown(plain)
  files: list[tuple[str, bytes]] = [('report.md', markdown.encode('utf-8'))]
  for name, make in (('accuracy_vs_epsilon.png', _plot_accuracy_vs_epsilon),
                     ('reliability.png', _plot_reliability)):
    png = make(plain['rows'])
    if png is not None:
      files.append((name, png))
  for sweep in plain.get('sweeps') or []:
    name = (f"sweep_{_safe_filename_part(sweep['defense'])}_"
            f"{_safe_filename_part(sweep['param'])}.png")
    files.append((name, _plot_sweep(sweep)))
  files.append(('report.json', json_text.encode('utf-8')))
  return [files.write_bytes_atomic(workdir / name, data) for name, data in files]


def training_curves_plot(metrics_rows: Sequence[Mapping[str, Any]], path: os.PathLike | str
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
    raise ValueError(f'training_curves_plot: no loss or accuracy metrics among keys {keys}; '
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
      ax.set_yscale('log')  # Losses shrink by orders of magnitude; a log axis keeps the tail visible.
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return files.write_bytes_atomic(path, _png_bytes(fig))


__all__ = [
    'CHECK_STATUSES', 'NORMS', 'flatten_dict', 'format_table', 'new_report',
    'render_markdown', 'training_curves_plot', 'validate_report', 'write_report',
]
