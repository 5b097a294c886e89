"""What advdef.sweep gathers: one record per point, rendered as sweep.md and sweep.png.

A record is {'index', 'name', 'overrides', 'status', 'workdir'} plus, for a finished point,
`summarize_report` of its report.json (clean accuracy per defense, worst-case accuracy per
defense, norm and epsilon) and, for a failed one, 'error'. Overrides are shown the same way
in sub-workdir names (advdef.sweep.point_name) and in sweep.md's columns: `short_names`,
`format_value`.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

from advdef import reporting


def format_value(value) -> str:
  """An override value as it appears in names and tables: strings bare, tuples compact."""
  if isinstance(value, str):
    return value
  if isinstance(value, tuple):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return repr(value)


def short_names(fields: Sequence[str]) -> dict[str, str]:
  """Last component of each dotted field, or the whole field where that is ambiguous."""
  last = [f.rsplit('.', 1)[-1] for f in fields]
  return {f: (s if last.count(s) == 1 else f) for f, s in zip(fields, last)}


def summarize_report(report: dict) -> dict[str, Any]:
  """Clean accuracy per defense; worst-case accuracy per (defense, norm, epsilon).

  The worst case is the report's per-example worst-case row; with a single attack at an
  epsilon (no worst-case row) it is that attack's accuracy.
  """
  rows = report.get('rows', [])
  clean = {r['defense']: r['accuracy'] for r in rows if r.get('attack') == 'none'}
  worst: dict[tuple, float] = {}
  for r in rows:
    if r.get('attack') == 'none' or r.get('epsilon') is None:
      continue
    k = (r['defense'], r['norm'], r['epsilon'])
    if r.get('worst_case'):
      worst[k] = r['accuracy']
    elif not any(x.get('worst_case') and (x['defense'], x['norm'], x['epsilon']) == k
                 for x in rows):
      worst[k] = min(worst.get(k, 1.0), r['accuracy'])
  return {'clean_accuracy': clean,
          'worst_case': [{'defense': d, 'norm': nm, 'epsilon': e, 'accuracy': a}
                         for (d, nm, e), a in worst.items()],
          'wall_seconds': report.get('wall_seconds')}


def _pct(x) -> str:
  # reporting has the same formatter, but private to its report tables.
  return '—' if x is None else f'{100 * x:.2f}%'


def _columns(records) -> tuple[list[str], list[tuple]]:
  defenses = list(dict.fromkeys(d for r in records for d in r.get('clean_accuracy', {})))
  worst = list(dict.fromkeys((w['defense'], w['norm'], w['epsilon']) for r in records
                             for w in r.get('worst_case', [])))
  worst.sort(key=lambda k: (defenses.index(k[0]) if k[0] in defenses else len(defenses),
                            k[1], k[2]))
  return defenses, worst


def render_markdown(records, *, source: str = '') -> str:
  """sweep.md: one row per point."""
  fields = list(dict.fromkeys(f for r in records for f in r['overrides']))
  short = short_names(fields)
  defenses, worst = _columns(records)
  many_norms = len({k[1] for k in worst}) > 1
  columns = (['#'] + [short[f] for f in fields] + ['status'] +
             [f'{d} clean' for d in defenses] +
             [f'{d} worst ε={e:g}' + (f' ({nm})' if many_norms else '') for d, nm, e in worst])
  rows = []
  for r in records:
    w = {(x['defense'], x['norm'], x['epsilon']): x['accuracy'] for x in r.get('worst_case', [])}
    status = r['status'] if r['status'] != 'failed' else f"failed: {r.get('error', '')}"
    rows.append([str(r['index'])] + [format_value(r['overrides'][f]) if f in r['overrides']
                                     else '—' for f in fields] + [status] +
                [_pct(r.get('clean_accuracy', {}).get(d)) for d in defenses] +
                [_pct(w.get(k)) for k in worst])
  done = sum(r['status'] == 'done' for r in records)
  out = ['# advdef sweep\n',
         f'{done} of {len(records)} points finished.' + (f' Sweep: `{source}`.' if source
                                                          else '') + '\n',
         'Clean: accuracy on clean test examples. Worst: per-example worst case over the '
         "run's attacks at that epsilon (each point's report.md has the details).\n",
         reporting.format_table(rows, columns)]
  return '\n'.join(out)


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def render_plot(records) -> bytes | None:
  """sweep.png: per defense, clean and worst-case accuracy against the swept field.

  The x axis is the first override field whose values are numeric and vary (points that
  share its value, e.g. seeds, are drawn as dots around their mean); otherwise the points.
  """
  done = [r for r in records if r['status'] == 'done']
  if not done:
    return None
  from matplotlib.figure import Figure  # Lazy: matplotlib costs ~0.5 s to import.
  fields = list(dict.fromkeys(f for r in records for f in r['overrides']))
  varying = [f for f in fields if _numeric([r['overrides'].get(f) for r in done])
             and len({r['overrides'].get(f) for r in done}) > 1]
  # Seeds are replicates, not a hyperparameter: another numeric field makes a better axis.
  x_field = next((f for f in varying if f.rsplit('.', 1)[-1] != 'seed'),
                 varying[0] if varying else None)
  defenses, worst = _columns(done)
  if x_field is None:
    xs = {r['index']: k for k, r in enumerate(done)}
  else:
    xs = {r['index']: float(r['overrides'][x_field]) for r in done}
  fig = Figure(figsize=(5.0 * max(1, len(defenses)), 4.0), dpi=100, layout='constrained')
  axes = fig.subplots(1, max(1, len(defenses)), squeeze=False)[0]
  for ax, d in zip(axes, defenses or ['']):
    series = [('clean', lambda r, d=d: r.get('clean_accuracy', {}).get(d))]
    for dd, nm, e in worst:
      if dd == d:
        series.append((f'worst ε={e:g}' + (f' {nm}' if len({k[1] for k in worst}) > 1 else ''),
                       lambda r, k=(dd, nm, e): next((w['accuracy'] for w in r['worst_case']
                                                      if (w['defense'], w['norm'],
                                                          w['epsilon']) == k), None)))
    for label, get in series:
      pts = [(xs[r['index']], get(r)) for r in done if get(r) is not None]
      if not pts:
        continue
      by_x: dict[float, list[float]] = {}
      for x, y in pts:
        by_x.setdefault(x, []).append(y)
      ux = sorted(by_x)
      line, = ax.plot(ux, [sum(by_x[x]) / len(by_x[x]) for x in ux], marker='o', label=label)
      if any(len(v) > 1 for v in by_x.values()):
        ax.scatter([x for x, _ in pts], [y for _, y in pts], color=line.get_color(), alpha=0.4,
                   s=12)
    if x_field is None:
      ax.set_xticks(list(xs.values()), [r['name'] for r in done], rotation=45, ha='right',
                    fontsize=7)
      ax.set_xlabel('point')
    else:
      ax.set_xlabel(x_field)
      if min(xs.values()) > 0 and max(xs.values()) / min(xs.values()) > 100:
        ax.set_xscale('log')
    ax.set_ylabel('accuracy')
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(d)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()
