"""The RL run's report: schema, validation, report.md, and the return-vs-lambda plot.

The classifier report (advdef.reporting) scores accuracies; an agent is scored by episode
returns, so the RL run has its own schema, written the same way (validated first, rendered
in memory, each file atomic through advdef.files, report.json last):

  report = {
    'advdef_version', 'created', 'task': 'rl', 'game': str, 'config': dict,
    'training': dict,               # env steps, updates, wall time, training return
    'random_policy': summary,       # the uniform random policy on the same episode seeds
    'rows': [{'defense', 'attack' ('none' = clean), 'epsilon' (lambda, L-inf, [0, 1]),
              'mean_return', 'ci95': [lo, hi] | None, 'std', 'n' (episodes),
              'mean_length', 'action_change_rate', 'stochastic', 'num_draws',
              'eot_samples', 'threat', 'seconds'}],
    'notes': [str], 'timing': dict, 'wall_seconds': float,
  }

Files: report.json, report.md, return_vs_epsilon.png (one panel per attack, a line per
defense with its 95% band, the random policy dashed), training_curves.png (training episode
return and TD loss against environment steps).
"""

from __future__ import annotations

import datetime
import io
import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from advdef import files
from advdef import reporting
from advdef import version

_REQUIRED = ('advdef_version', 'created', 'task', 'game', 'config', 'training',
             'random_policy', 'rows', 'notes')
_OPTIONAL = ('timing', 'wall_seconds')
_ROW_REQUIRED = ('defense', 'attack', 'epsilon', 'mean_return', 'ci95', 'n')
_ROW_OPTIONAL = ('std', 'mean_length', 'action_change_rate', 'stochastic', 'num_draws',
                 'eot_samples', 'threat', 'seconds')
_EMPTY = '—'


def new_report(*, config: Any, game: str) -> dict[str, Any]:
  return {'advdef_version': version.__version__,
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'task': 'rl', 'game': game, 'config': files.to_jsonable(config), 'training': {},
          'random_policy': None, 'rows': [], 'notes': []}


def _number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def validate_report(report: Mapping[str, Any]) -> None:
  """Raises ValueError listing every way `report` departs from the schema above."""
  report = files.to_jsonable(report)
  problems = [f'missing key {k!r}' for k in _REQUIRED if k not in report]
  problems += [f'unknown key {k!r}' for k in report if k not in _REQUIRED + _OPTIONAL]
  for i, row in enumerate(report.get('rows', [])):
    where = f"rows[{i}] ({row.get('defense')!r}, {row.get('attack')!r}, {row.get('epsilon')!r})"
    problems += [f'{where}: missing {k!r}' for k in _ROW_REQUIRED if k not in row]
    problems += [f'{where}: unknown {k!r}' for k in row if k not in _ROW_REQUIRED + _ROW_OPTIONAL]
    if not _number(row.get('mean_return')):
      problems.append(f"{where}: 'mean_return' must be a finite number, got "
                      f"{row.get('mean_return')!r}")
    eps = row.get('epsilon')
    if not (_number(eps) and 0.0 <= eps <= 1.0):
      problems.append(f"{where}: 'epsilon' must be in [0, 1], got {eps!r}")
    ci = row.get('ci95')
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci))
                               and ci[0] <= ci[1]):
      problems.append(f"{where}: 'ci95' must be [lo, hi] with lo <= hi or None, got {ci!r}")
    if not (isinstance(row.get('n'), int) and row['n'] >= 1):
      problems.append(f"{where}: 'n' must be a positive int, got {row.get('n')!r}")
  rp = report.get('random_policy')
  if rp is not None and not (isinstance(rp, Mapping) and _number(rp.get('mean_return'))):
    problems.append(f"'random_policy' must be a summary with a finite mean_return, got {rp!r}")
  if problems:
    raise ValueError('invalid RL report (nothing was written):\n  - ' + '\n  - '.join(problems))


def _fmt(x, spec='.2f') -> str:
  return format(float(x), spec) if _number(x) else _EMPTY


def _ci(ci) -> str:
  return _EMPTY if not ci else f'[{ci[0]:.2f}, {ci[1]:.2f}]'


def _pct(x) -> str:
  return _EMPTY if not _number(x) else f'{100 * float(x):.1f}%'


def render_markdown(report: Mapping[str, Any]) -> str:
  """report.md: timing, training, the random baseline, the rows per defense, notes."""
  out = [f"# advdef RL report: DQN on MinAtar {report['game']}\n",
         f"Created {report['created']} with advdef {report['advdef_version']}.\n"]
  if report.get('timing'):
    out.append(reporting.timing_line(report['timing']) + '\n')
  if report['training']:
    out.append('## Training\n')
    out.append(reporting.format_table(
        [[k, v] for k, v in reporting.flatten_dict(report['training']).items()],
        ['quantity', 'value']))
  rp = report.get('random_policy')
  if rp:
    out.append(f"Uniform random policy on the same episode seeds: mean return "
               f"{_fmt(rp['mean_return'])} {_ci(rp.get('ci95'))} (n = {rp['n']}, mean length "
               f"{_fmt(rp.get('mean_length'), '.1f')}).\n")
  rows = list(report['rows'])
  if rows:
    out.append('## Episode return under attack\n')
    out.append('Mean episode return over the same fixed episode seeds for every row, with its '
               '95% t-interval; λ is the L∞ budget on observations in [0, 1]; "changed" is the '
               "share of the agent's decisions the perturbation changed; seconds is the "
               "row's share of its program's call (a program's first call includes compiling "
               'it).\n')
    order = {d: i for i, d in enumerate(dict.fromkeys(r['defense'] for r in rows))}
    rows.sort(key=lambda r: (order[r['defense']], r['attack'] != 'none', r['attack'],
                             r['epsilon']))
    out.append(reporting.format_table(
        [[r['defense'], r['attack'], f"{r['epsilon']:.4g}", _fmt(r['mean_return']),
          _ci(r['ci95']), r['n'], _fmt(r.get('mean_length'), '.1f'),
          _pct(r.get('action_change_rate')), r.get('threat') or _EMPTY,
          _fmt(r.get('seconds'), '.1f')] for r in rows],
        ['defense', 'attack', 'λ', 'mean return', '95% CI', 'n', 'mean length', 'changed',
         'threat', 'seconds']))
  if report['notes']:
    out.append('## Notes\n')
    out.append(''.join(f'- {n}\n' for n in report['notes']))
  return '\n'.join(out)


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: ~0.5 s to import.
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight', pad_inches=0.1)
  return buf.getvalue()


def return_vs_epsilon_figure(rows: Sequence[Mapping[str, Any]],
                             random_policy: Mapping[str, Any] | None):
  """One panel per attack: mean return vs lambda per defense (95% band); None if no attack."""
  attacks = list(dict.fromkeys(r['attack'] for r in rows if r['attack'] != 'none'))
  if not attacks:
    return None
  defenses = list(dict.fromkeys(r['defense'] for r in rows))
  colors = {d: f'C{i % 10}' for i, d in enumerate(defenses)}
  fig = _figure(3.6 * len(attacks) + 2.4, 3.2)
  axes = fig.subplots(1, len(attacks), squeeze=False, sharey=True)[0]
  for ax, attack in zip(axes, attacks):
    for d in defenses:
      pts = [r for r in rows if r['defense'] == d and r['attack'] in ('none', attack)]
      pts.sort(key=lambda r: r['epsilon'])
      xs = [r['epsilon'] for r in pts]
      ax.plot(xs, [r['mean_return'] for r in pts], marker='o', markersize=3, color=colors[d],
              label=d)
      if all(r['ci95'] for r in pts):
        ax.fill_between(xs, [r['ci95'][0] for r in pts], [r['ci95'][1] for r in pts],
                        color=colors[d], alpha=0.15, linewidth=0)
    if random_policy:
      ax.axhline(random_policy['mean_return'], color='gray', linestyle='--',
                 label='random policy')
    ax.set_title(attack, fontsize=10)
    ax.set_xlabel('λ (L∞, observations in [0, 1])')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('mean episode return')
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside right center', fontsize=8, frameon=False)
  return fig


def training_curves_figure(metrics_rows: Sequence[Mapping[str, Any]]):
  """Training episode return and TD loss against environment steps; None without rows."""
  keys = (('train/episode_return', 'episode return (ε-greedy)'), ('train/loss', 'TD loss'))
  panels = [(k, t, [(r['step'], r[k]) for r in metrics_rows if _number(r.get(k))])
            for k, t in keys]
  panels = [p for p in panels if p[2]]
  if not panels:
    return None
  fig = _figure(4.6 * len(panels), 3.2)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (_, title, pts) in zip(axes, panels):
    ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('environment steps')
    ax.grid(alpha=0.3)
  return fig


def write_report(workdir: os.PathLike | str, report: Mapping[str, Any],
                 metrics_rows: Sequence[Mapping[str, Any]] = ()) -> list[pathlib.Path]:
  """Validates `report`, then writes report.md, the plots and report.json (last)."""
  validate_report(report)
  plain = files.to_jsonable(report)
  outputs = [('report.md', render_markdown(plain).encode('utf-8'))]
  for name, fig in (('return_vs_epsilon.png',
                     return_vs_epsilon_figure(plain['rows'], plain.get('random_policy'))),
                    ('training_curves.png', training_curves_figure(metrics_rows))):
    if fig is not None:
      outputs.append((name, _png(fig)))
  outputs.append(('report.json', files.dumps_json(plain).encode('utf-8')))
  workdir = pathlib.Path(workdir)
  return [files.write_bytes_atomic(workdir / name, data) for name, data in outputs]
