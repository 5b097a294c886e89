"""Evaluation reports: the report schema, its validation, and its JSON/Markdown renderings.

The evaluation code fills a plain dict (see `new_report` and the schema below);
`write_report` validates it and writes `report.json`, `report.md` and the plots
drawn by advdef.plots into the run's workdir (atomically, through advdef.files).

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
              'paper_relative_noise', 'paper_absolute_noise', 'paper_noise_space',
              'worst_case', 'attacks', 'seconds'}],
    'checks': [{'defense': str, 'name': str, 'status': 'pass'|'warn'|'fail',
                'detail': str}],
    'sweeps': [{'defense', 'param', 'values', 'clean_accuracy',
                'robust_accuracy', 'attack', 'epsilon'}],   # optional key
    'notes': [str],
  }

Non-finite floats (NaN, inf) are written to JSON as null, so every file stays
valid JSON that any reader accepts.

Writing a report needs no display: advdef.plots draws through `matplotlib.figure.Figure`
(Agg canvas), never pyplot, and imports matplotlib only when it draws.
"""

from __future__ import annotations

import datetime
import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from advdef import files
from advdef import version
from advdef import plots

NORMS = ('linf', 'l2')
CHECK_STATUSES = ('pass', 'warn', 'fail')

_REQUIRED_REPORT_KEYS = ('advdef_version', 'created', 'config', 'dataset', 'model', 'training',
                         'rows', 'checks', 'notes')
_OPTIONAL_REPORT_KEYS = ('sweeps', 'wall_seconds', 'timing', 'machine', 'model_summary')
_REQUIRED_ROW_KEYS = ('defense', 'attack', 'norm', 'epsilon', 'accuracy', 'ci95', 'n')
_OPTIONAL_ROW_KEYS = ('per_draw_accuracy', 'per_draw_ci95', 'num_draws', 'nll', 'ece', 'brier',
                      'calibration_bins', 'median_perturbation', 'median_relative_perturbation',
                      'worst_case', 'attacks', 'seconds', 'stochastic', 'threat', 'eot_samples',
                      'success_rate', 'attack_success_rate', 'ensemble', 'tolerance_curve',
                      'paper_relative_noise', 'paper_absolute_noise', 'paper_noise_space')
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
  return {
      'advdef_version': version.__version__,
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


def _is_nonempty_str(x: Any) -> bool:
  return isinstance(x, str) and bool(x)


# Field rules of the report's lists: (key, predicate, what the value must be), checked when
# the key is present, in this order.
_ROW_RULES = (
    ('defense', _is_nonempty_str, 'a non-empty string'),
    ('attack', _is_nonempty_str, 'a non-empty string'),
    ('norm', lambda v: v in (*NORMS, None), f'one of {list(NORMS)} or None'),
    ('epsilon', lambda v: v is None or (_is_number(v) and math.isfinite(float(v)) and v >= 0),
     'a finite number >= 0 or None'),
    ('accuracy', _is_probability, 'a number in [0, 1]'),
    ('ci95', lambda v: v is None or _is_interval(v), '[lo, hi] with 0 <= lo <= hi <= 1 or None'),
    ('n', lambda v: _is_int(v) and v >= 0, 'a non-negative int'),
    ('per_draw_accuracy', _is_probability, 'a number in [0, 1]'),
    ('per_draw_ci95', _is_interval, '[lo, hi] with 0 <= lo <= hi <= 1'),
    ('num_draws', lambda v: _is_int(v) and v >= 1, 'a positive int'),
    # NaN is allowed here (e.g. an NLL that overflowed); it is written as null.
    *((key, lambda v: v is None or _is_number(v), 'a number or None')
      for key in ('nll', 'ece', 'brier', 'median_perturbation', 'median_relative_perturbation',
                  'paper_relative_noise', 'paper_absolute_noise', 'seconds')),
    ('worst_case', lambda v: isinstance(v, (bool, np.bool_)), 'a bool'),
)
_CHECK_RULES = (
    *((key, lambda v: isinstance(v, str), 'a string') for key in ('defense', 'name', 'detail')),
    ('status', lambda v: v in CHECK_STATUSES, f'one of {list(CHECK_STATUSES)}'),
)


def _row_cross_checks(where: str, row: Mapping[str, Any], problems: list[str]) -> None:
  if row.get('worst_case'):
    attacks = row.get('attacks')
    if not (isinstance(attacks, (list, tuple)) and attacks
            and all(isinstance(a, str) for a in attacks)):
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
        problems.append(f"{where}: 'calibration_bins' lists must have equal lengths, "
                        f'got {lengths}')


def _sweep_cross_checks(where: str, sweep: Mapping[str, Any], problems: list[str]) -> None:
  if any(k not in sweep for k in _SWEEP_KEYS):
    return  # Already reported as missing; the checks below read every key.
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


# The report's lists of dicts: key -> (required keys, optional keys, a function naming an
# item in messages, field rules, a function of checks across fields or None).
_ITEM_LISTS = {
    'rows': (_REQUIRED_ROW_KEYS, _OPTIONAL_ROW_KEYS,
             lambda r: (f"defense {r.get('defense')!r}, attack {r.get('attack')!r}, "
                        f"epsilon {r.get('epsilon')!r}"), _ROW_RULES, _row_cross_checks),
    'checks': (_CHECK_KEYS, (), lambda c: f"{c.get('defense')!r}, {c.get('name')!r}",
               _CHECK_RULES, None),
    'sweeps': (_SWEEP_KEYS, (), lambda s: f"{s.get('defense')!r}, {s.get('param')!r}", (),
               _sweep_cross_checks),
}


def _validate_items(key: str, items: Any, problems: list[str]) -> None:
  """Checks report[key], a list of dicts, appending one message per problem."""
  if not isinstance(items, (list, tuple)):
    problems.append(f'{key!r} must be a list, got {type(items).__name__}')
    return
  required, optional, describe, rules, cross_checks = _ITEM_LISTS[key]
  for i, item in enumerate(items):
    if not isinstance(item, Mapping):
      problems.append(f'{key}[{i}]: must be a dict, got {type(item).__name__}')
      continue
    where = f'{key}[{i}] ({describe(item)})'
    missing = [k for k in required if k not in item]
    if missing:
      problems.append(f'{where}: missing required key(s) {missing}')
    unknown = sorted(set(item) - set(required) - set(optional))
    if unknown:
      hint = f'; allowed optional keys are {list(optional)}' if optional else ''
      problems.append(f'{where}: unknown key(s) {unknown}{hint}')
    for field, ok, what in rules:
      if field in item and not ok(item[field]):
        # A required number that is None was NaN or inf before to_jsonable.
        nan = ' (NaN or inf)' if item[field] is None and ok is _is_probability else ''
        problems.append(f'{where}: {field!r} must be {what}, got {item[field]!r}{nan}')
    if cross_checks:
      cross_checks(where, item, problems)


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
    problems.append(f'missing top-level key(s) {missing} '
                    '(advdef.reporting.new_report fills them)')
  unknown = sorted(set(report) - set(_REQUIRED_REPORT_KEYS) - set(_OPTIONAL_REPORT_KEYS))
  if unknown:
    problems.append(f'unknown top-level key(s) {unknown}')
  for key in ('advdef_version', 'created', 'dataset', 'model'):
    if key in report and not isinstance(report[key], str):
      problems.append(f'{key!r} must be a string, got {report[key]!r}')
  if 'config' in report and not (isinstance(report['config'], Mapping)
                                 or hasattr(report['config'], 'to_dict')):
    problems.append(f"'config' must be a dict, got {type(report['config']).__name__}")
  if 'training' in report and not (report['training'] is None
                                   or isinstance(report['training'], Mapping)):
    problems.append(f"'training' must be a dict or None, "
                    f"got {type(report['training']).__name__}")
  for key in _ITEM_LISTS:
    _validate_items(key, report.get(key, []), problems)
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


def _optional_columns(rows, spec):
  """Returns the (header, formatter) pairs of `spec` whose key some row has (not None)."""
  return [(header, fmt) for key, header, fmt in spec
          if any(r.get(key) is not None for r in rows)]


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
    # The JumpReLU paper's "Rel. Noise": a mean over all examples, in the normalised space.
    ('paper_relative_noise', 'paper rel. noise',
     lambda r: _num(r.get('paper_relative_noise'), '.4g')),
)
_SECONDS_COLUMNS = (('seconds', 'seconds', lambda r: _num(r.get('seconds'), '.1f')),)


# Columns of the row tables, by header; _rows_table picks them.
_ROW_COLUMNS = {
    'defense': lambda r: r['defense'], 'attack': lambda r: r['attack'],
    'norm': lambda r: r['norm'] or _EMPTY, 'ε': lambda r: _eps(r['epsilon']),
    'accuracy': lambda r: _pct(r['accuracy']), '95% CI': lambda r: _ci(r['ci95']),
    'n': lambda r: str(r['n']), 'attacks': lambda r: ', '.join(r['attacks']),
}


def _rows_table(rows, headers, optional_specs):
  """A table of `rows` with the `headers` columns, then the optional ones some row has."""
  columns = [(h, _ROW_COLUMNS[h]) for h in headers]
  for spec in optional_specs:
    columns += _optional_columns(rows, spec)
  return format_table([[f(r) for _, f in columns] for r in rows], [h for h, _ in columns])


def _epsilon_order(row: Mapping[str, Any]) -> float:
  return -1.0 if row['epsilon'] is None else row['epsilon']


def timing_line(timing: Mapping[str, Any]) -> str:
  """One sentence: wall time, training vs evaluation, and the share spent compiling."""
  wall = timing['wall_seconds']
  compiling = timing.get('compile_seconds', 0.0) + timing.get('trace_seconds', 0.0)
  text = (f"Wall time {wall:.1f} s (training {timing.get('train_seconds', 0.0):.1f} s, "
          f"evaluation {timing.get('evaluate_seconds', 0.0):.1f} s), of which {compiling:.1f} s "
          f"({compiling / max(wall, 1e-9):.0%}) tracing and compiling "
          f"{timing.get('compilations', 0)} programs")
  if timing.get('cache_hits'):
    text += f", {timing['cache_hits']} of them read from the persistent compilation cache"
  return text + '.'


def render_markdown(report: Mapping[str, Any]) -> str:
  """Renders a validated report as Markdown (the content of report.md)."""
  rows = list(report['rows'])
  clean, attacked, worst = _split_rows(rows)
  out = [f"# advdef report: {report['model']} on {report['dataset']}\n",
         f"Created {report['created']} with advdef {report['advdef_version']}.\n"]
  timing = report.get('timing')
  if timing:
    out.append(timing_line(timing) + '\n')

  training = report.get('training')
  if training:
    out.append('## Training\n')
    flat = flatten_dict(training)
    out.append(format_table([[k, v] for k, v in flat.items()], ['quantity', 'value']))

  if clean:
    out.append('## Clean accuracy\n')
    out.append(_rows_table(clean, ('defense', 'accuracy', '95% CI', 'n'),
                           [_DRAW_COLUMNS, _CALIBRATION_COLUMNS, _SECONDS_COLUMNS]))

  if attacked:
    out.append('## Robustness\n')
    attacked = sorted(attacked, key=lambda r: (r['defense'], r['attack'], _norm_key(r['norm']),
                                               _epsilon_order(r)))
    out.append(_rows_table(attacked, ('defense', 'attack', 'norm', 'ε', 'accuracy', '95% CI', 'n'),
                           [_DRAW_COLUMNS, _PERTURBATION_COLUMNS, _CALIBRATION_COLUMNS,
                            _SECONDS_COLUMNS]))

  if worst:
    out.append('## Worst case over attacks\n')
    out.append('Per-example minimum over the listed attacks: an example counts as robust only if '
               'every attack failed on it.\n')
    worst = sorted(worst, key=lambda r: (r['defense'], _norm_key(r['norm']), _epsilon_order(r)))
    out.append(_rows_table(worst, ('defense', 'norm', 'ε', 'accuracy', '95% CI', 'n', 'attacks'),
                           [_DRAW_COLUMNS]))

  curves = [r for r in attacked if r.get('tolerance_curve')]
  if curves:
    out.append('## Accuracy within a distortion tolerance\n')
    out.append('Minimum-perturbation attacks: an example counts as broken at tolerance t only if '
               "its adversarial example, within t, fools the defense's decision rule on fresh "
               'draws.\n')
    out.append(format_table(
        [[r['defense'], r['attack'], r['norm'], _format_cell(p['tolerance']), _pct(p['accuracy']),
          _ci(p['ci95'])] for r in curves for p in r['tolerance_curve']],
        ['defense', 'attack', 'norm', 'tolerance', 'accuracy', '95% CI']))

  ensembles = [r for r in rows if r.get('ensemble')]
  if ensembles:
    out.append('## Ensemble size\n')
    out.append('Accuracy of the mean softmax of the first n Monte-Carlo draws.\n')
    out.append(format_table(
        [[r['defense'], r['attack'], _eps(r['epsilon']) if r['epsilon'] is not None else _EMPTY,
          p['draws'], _pct(p['accuracy']), _ci(p['ci95'])] for r in ensembles
         for p in r['ensemble']], ['defense', 'attack', 'ε', 'draws', 'accuracy', '95% CI']))

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
# Writing.


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
  clean, attacked, worst = _split_rows(plain['rows'])
  outputs: list[tuple[str, bytes | None]] = [
      ('report.md', render_markdown(plain).encode('utf-8')),
      ('accuracy_vs_epsilon.png', plots.accuracy_vs_epsilon(clean, attacked + worst)),
      ('reliability.png', plots.reliability(clean))]
  for sweep in plain.get('sweeps') or []:
    name = (f"sweep_{_safe_filename_part(sweep['defense'])}_"
            f"{_safe_filename_part(sweep['param'])}.png")
    outputs.append((name, plots.sweep(sweep)))
  outputs.append(('report.json', files.dumps_json(plain).encode('utf-8')))
  return [files.write_bytes_atomic(workdir / name, data) for name, data in outputs
          if data is not None]


__all__ = [
    'CHECK_STATUSES', 'NORMS', 'flatten_dict', 'format_table', 'new_report',
    'render_markdown', 'validate_report', 'write_report',
]
