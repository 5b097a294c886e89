"""The reproduction frame shared by every paper: runner, time estimates, verdicts, RESULTS.md.

A paper (advdef.reproduce.PAPERS) names its config file, configs/repro_<paper>.py, which
lists the paper's experiments per scale (`experiments(scale)`: name, kind, model, needs,
defenses, attacks, what) and builds each one's config (`get_config('<name>,<scale>[,base=
<workdir>]')`), and its section renderer, `render(RunSet, figures_dir) -> Section`.

  runs = plan(paper, 'cpu', '/tmp/repro')      # configs and time estimates, no compute
  run_all(runs)                                # python -m advdef.main per unfinished run
  write_results(runs, 'RESULTS.md')            # the paper's section and its plots

Resuming: a run whose workdir holds report.json is finished and skipped, provided the report
was made with the same config (else the runner stops and says which fields differ); a run
without one is started again, and advdef.main resumes it from its checkpoints and stored
evaluation results.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable, TextIO

import numpy as np

from advdef import config_utils
from advdef import files
from advdef import reporting
from advdef.evaluators import results as results_lib
from advdef.reproduce import estimates

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALES = ('smoke', 'cpu', 'full')
SCALE_NOTE = {
    'smoke': 'Smoke scale: a tiny model on a few fake images, to test the plumbing; the numbers '
             'mean nothing.',
    'cpu': 'CPU scale: real images (CIFAR-10 from cifar10_partial, MNIST from mnist10k), but a '
           'small training set, a short schedule and few attacked examples; it shows trends, '
           'not the paper\'s numbers.',
    'full': "Full scale: the paper's data, network and schedule.",
}
ESTIMATE_NOTE = {
    'smoke': 'for a quiet 2-core CPU',
    'cpu': 'for a quiet 2-core CPU, from passes measured on one effective core ÷ 1.7',
    'full': 'for one datacenter GPU, from assumed per-pass costs, not measured: ±3×',
}
TIMING_FILE = 'reproduce_run.json'
_DEFAULTS = reporting.flatten_dict(files.to_jsonable(config_utils.to_dict(
    config_utils.base_config())))


@dataclasses.dataclass(frozen=True)
class Paper:
  """A reproducible paper: its config file (relative to the repository) and renderer."""
  name: str
  title: str
  config: str
  render: Callable[['RunSet', str], 'Section']


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One entry of a config's `experiments(scale)`."""
  name: str
  kind: str          # 'train', 'fgsm', 'adaptive', ... (the renderer's grouping)
  model: str         # the trained network evaluated
  needs: str         # the experiment whose workdir is `base` ('' for none)
  defenses: tuple[str, ...]
  attacks: tuple[str, ...]
  what: str


@dataclasses.dataclass
class Run:
  """An experiment at a scale: its workdir, config, time estimate and (when finished) report."""
  experiment: Experiment
  workdir: str
  arg: str
  config: Any
  estimate_s: float
  report: dict | None = None


@dataclasses.dataclass
class RunSet:
  paper: Paper
  scale: str
  root: str
  runs: list[Run]

  def get(self, name: str) -> Run | None:
    return next((r for r in self.runs if r.experiment.name == name), None)

  def finished(self, kind: str | None = None) -> list[Run]:
    return [r for r in self.runs if r.report is not None
            and (kind is None or r.experiment.kind == kind)]


@dataclasses.dataclass
class Section:
  """A rendered paper section: Markdown, and PNG bytes by file name (None: nothing drawn)."""
  markdown: str
  figures: dict[str, bytes | None]


# ----------------------------------------------------------------------------------------
# Planning: configs, commands, time estimates.


def config_module(paper: Paper):
  path = os.path.join(REPO, paper.config)
  spec = importlib.util.spec_from_file_location(f'repro_{paper.name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def plan(paper: Paper, scale: str, root: str) -> RunSet:
  """Every experiment of `paper` at `scale` with its config and estimate; reads finished
  reports. No compute."""
  if scale not in SCALES:
    raise ValueError(f'--scale={scale}: valid scales are {", ".join(SCALES)}')
  root = os.path.abspath(root)
  module = config_module(paper)
  runs = []
  for entry in module.experiments(scale):
    exp = Experiment(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items()})
    arg = f'{exp.name},{scale}'
    if exp.needs:
      arg += f',base={workdir(root, paper, exp.needs)}'
    config = module.get_config(arg)
    run = Run(exp, workdir(root, paper, exp.name), arg, config,
              estimates.estimate_seconds(config, 'gpu' if scale == 'full' else 'cpu2'))
    run.report = read_report(run)
    runs.append(run)
  return RunSet(paper, scale, root, runs)


def workdir(root: str, paper: Paper, name: str) -> str:
  return os.path.join(root, paper.name, name)


def command(paper: Paper, run: Run) -> list[str]:
  return [sys.executable, '-m', 'advdef.main', f'--config={paper.config}:{run.arg}',
          f'--workdir={run.workdir}']


def read_report(run: Run) -> dict | None:
  """The run's report.json, None when unfinished; ValueError when it was made with
  another config (the fields that differ are named)."""
  path = os.path.join(run.workdir, 'report.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  made = reporting.flatten_dict(report.get('config') or {})
  want = reporting.flatten_dict(files.to_jsonable(config_utils.to_dict(run.config)))
  # A field added to advdef after the run was made, and left at its default, changes nothing
  # the run computed.
  added = {k for k in set(want) - set(made) if want[k] == _DEFAULTS.get(k, object())}
  diff = sorted(k for k in (set(made) | set(want)) - added if made.get(k) != want.get(k))
  if diff:
    shown = '; '.join(f'{k}: {made.get(k)!r} != {want.get(k)!r}' for k in diff[:4])
    more = '; ...' if len(diff) > 4 else ''
    raise ValueError(f'{path} was made with another config ({shown}{more}); remove that '
                     'workdir or use another --root')
  return report


def minutes(seconds: float) -> str:
  return f'{seconds / 60:.1f} min' if seconds < 5940 else f'{seconds / 3600:.1f} h'


# ----------------------------------------------------------------------------------------
# Running.


def run_all(runs: RunSet, *, out: TextIO = sys.stdout, verbose: bool = False) -> None:
  """Runs every unfinished experiment in order; one progress line per run on `out`.

  Raises SystemExit(1) when a run fails, after showing the end of its log.
  """
  t0 = time.time()
  spent, estimated = 0.0, 0.0  # of the runs executed here: measured vs estimated seconds
  total = len(runs.runs)
  for k, run in enumerate(runs.runs, 1):
    name = run.experiment.name
    head = f'[{runs.paper.name} {runs.scale} {k}/{total}] {name}'
    remaining = sum(r.estimate_s for r in runs.runs[k - 1:] if r.report is None)
    factor = spent / estimated if estimated else 1.0
    clock = f'elapsed {minutes(time.time() - t0)}, est. left {minutes(remaining * factor)}'
    if run.report is None:  # Another runner may have finished it since `plan`.
      run.report = read_report(run)
    if run.report is not None:
      print(f'{head}: skipped, finished (report.json) | {clock}', file=out, flush=True)
      continue
    print(f'{head}: running (est. {minutes(run.estimate_s * factor)}) | {clock} ...',
          end='\n' if verbose else '', file=out, flush=True)
    os.makedirs(run.workdir, exist_ok=True)
    log_path = os.path.join(run.workdir, 'run.log')
    start = time.time()
    with open(log_path, 'a') as log:
      proc = subprocess.run(command(runs.paper, run), cwd=REPO,
                            stdout=None if verbose else log,
                            stderr=None if verbose else subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0:
      print(f' FAILED (exit code {proc.returncode}) after {minutes(seconds)}; the end of '
            f'{log_path}:', file=out, flush=True)
      with open(log_path, errors='replace') as log:
        print(''.join(log.readlines()[-20:]), file=out, flush=True)
      raise SystemExit(1)
    spent += seconds
    estimated += run.estimate_s
    files.write_json_atomic(os.path.join(run.workdir, TIMING_FILE),
                            {'seconds': seconds, 'estimate_seconds': run.estimate_s,
                             'command': command(runs.paper, run)[1:]})
    run.report = read_report(run)
    print(f'{" " + head if verbose else ""} done in {minutes(seconds)}', file=out, flush=True)
  print(f'[{runs.paper.name} {runs.scale}] all {total} runs finished; this invocation took '
        f'{minutes(time.time() - t0)}', file=out, flush=True)


def run_seconds(run: Run) -> float | None:
  """A finished run's wall time as the runner measured it (process start-up included),
  else advdef's own (report['wall_seconds'])."""
  try:
    with open(os.path.join(run.workdir, TIMING_FILE)) as f:
      return float(json.load(f)['seconds'])
  except (OSError, ValueError, KeyError, TypeError):
    return (run.report or {}).get('wall_seconds')


def timing_table(runs: RunSet) -> str:
  """A section's run-time table: every experiment, measured and estimated."""
  rows, spent = [], 0.0
  for r in runs.runs:
    wall = run_seconds(r)
    spent += wall or 0.0
    rows.append([r.experiment.name, r.experiment.what,
                 minutes(wall) if wall else '—', minutes(r.estimate_s)])
  estimated = minutes(sum(r.estimate_s for r in runs.runs))
  made = sorted(r.report['created'][:10] for r in runs.runs
                if r.report is not None and r.report.get('created'))
  dates = '' if not made else (f' Runs made {made[0]}' + (f' to {made[-1]}' if made[-1] != made[0]
                                                          else '') + ' (report.json).')
  return (reporting.format_table(rows, ['experiment', 'what', 'measured', 'estimated'])
          + f'\nTotal measured: {minutes(spent)} (process start-up included; a machine '
          'shared with other jobs, or runners in parallel, stretches it); '
          f'estimated: {estimated} ({ESTIMATE_NOTE[runs.scale]}).{dates}\n')


def accuracy_figure(height: float = 4.2):
  """(figure, axes) for an accuracy plot: a Figure with its Agg canvas (no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7.5, height), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def finish_accuracy_figure(fig, ax, xlabel: str, ylabel: str = 'accuracy'):
  """Labels, a 0-100% y axis, a light grid and one legend outside the axes."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(-0.02, 1.02)
  ax.yaxis.set_major_formatter(lambda v, _: f'{100 * v:.0f}%')
  ax.grid(alpha=0.3)
  fig.legend(loc='outside right upper', fontsize=8, frameon=False)
  return fig


def png(fig) -> bytes | None:
  """A matplotlib figure as PNG bytes (None for no figure)."""
  if fig is None:
    return None
  import io
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight', pad_inches=0.1)
  return buf.getvalue()


def describe(runs: RunSet, out: TextIO = sys.stdout) -> None:
  """--list: every experiment with its estimate, state and command."""
  total = sum(r.estimate_s for r in runs.runs)
  left = sum(r.estimate_s for r in runs.runs if r.report is None)
  platform = estimates.COSTS['gpu' if runs.scale == 'full' else 'cpu2']
  print(f'{runs.paper.title}, scale {runs.scale}: {len(runs.runs)} experiments, estimated '
        f'{minutes(total)} ({minutes(left)} left'
        + (f'; {minutes(total * platform["speedup"])} on one effective core'
           if platform['speedup'] != 1 else '') + ')', file=out)
  for k, r in enumerate(runs.runs, 1):
    state = 'finished' if r.report is not None else 'to run'
    needs = f', needs {r.experiment.needs}' if r.experiment.needs else ''
    print(f'{k:2d}. {r.experiment.name:<18} {minutes(r.estimate_s):>9}  {state}{needs}: '
          f'{r.experiment.what}', file=out)
    print(f'    {" ".join(command(runs.paper, r)[1:])}', file=out)


# ----------------------------------------------------------------------------------------
# RESULTS.md.

DOC_HEADER = """# Reproductions

What advdef finds when it re-runs the experiments of the papers it implements: each claim
beside the paper's number, advdef under the paper's own protocol and under the adaptive
attack suite. Generated by `scripts/reproduce.py`; each paper's section is regenerated on its
own, between its markers.
"""


def markers(paper: str) -> tuple[str, str]:
  return f'<!-- paper:{paper} begin -->', f'<!-- paper:{paper} end -->'


def replace_section(document: str, paper: str, body: str) -> str:
  """The document with the paper's section (markers included) replaced, or appended."""
  begin, end = markers(paper)
  block = f'{begin}\n{body.strip()}\n{end}'
  i, j = document.find(begin), document.find(end)
  if i >= 0 and j > i:
    return document[:i] + block + document[j + len(end):]
  if not document.strip():
    document = DOC_HEADER
  return document.rstrip('\n') + '\n\n' + block + '\n'


def write_results(runs: RunSet, results_path: str) -> list[str]:
  """Renders the paper's section into `results_path` and its plots into
  results/<paper>/ beside it; returns the paths written."""
  results_path = os.path.abspath(results_path)
  figures_rel = f'results/{runs.paper.name}'
  section = runs.paper.render(runs, figures_rel)
  written = []
  for name, png in section.figures.items():
    if png is not None:
      path = os.path.join(os.path.dirname(results_path), figures_rel, name)
      written.append(str(files.write_bytes_atomic(path, png)))
  document = ''
  if os.path.exists(results_path):
    with open(results_path) as f:
      document = f.read()
  files.write_text_atomic(results_path, replace_section(document, runs.paper.name,
                                                        section.markdown))
  return written + [results_path]


# ----------------------------------------------------------------------------------------
# Reading finished runs.


def per_example(run: Run, array: str = 'correct') -> dict[tuple[str, str, float], np.ndarray]:
  """Per-example correctness bool[n] of each attack row of a finished run (or another stored
  array: 'perturbation_norm', float32[n], of minimum-perturbation rows), keyed by (defense,
  attack, epsilon), from its stored evaluation results (advdef.evaluators.results); only
  entries that match a row of report.json are used."""
  rows = {(r['defense'], r['attack'], r['epsilon']): r for r in run.report['rows']
          if r['attack'] != 'none' and not r.get('worst_case')}
  out = {}
  pattern = os.path.join(run.workdir, results_lib.RESULTS_DIR, 'attack_suite-*.json')
  for path in sorted(glob.glob(pattern)):
    try:
      with open(path) as f:
        record = json.load(f)
      value, arr = record['value'], record['arrays'][array]
      key = (value['defense'], value['attack'], value['epsilon'])
    except (ValueError, KeyError, TypeError):
      continue
    row = rows.get(key)
    if row is None or row['accuracy'] != value['accuracy'] or row['n'] != value['n']:
      continue
    values = np.frombuffer(base64.b64decode(arr['base64']), np.dtype(arr['dtype']))
    values = values.reshape(arr['shape'])
    out[key] = values.astype(bool) if array == 'correct' else values
  return out


# ----------------------------------------------------------------------------------------
# Verdicts.

REPRODUCED = 'reproduced'
NOT_REPRODUCED = 'not reproduced'
PAPER_ONLY = "reproduced only under the paper's attack"
INCONCLUSIVE = 'inconclusive'
NOT_RUN = 'not run at this scale'
NOT_COMPARABLE = 'not comparable at this scale'
VALUE_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Measure:
  """An accuracy with its 95% interval and example count."""
  accuracy: float
  ci95: tuple[float, float]
  n: int

  @classmethod
  def of(cls, row: dict | None) -> 'Measure | None':
    if row is None:
      return None
    ci = row.get('ci95') or (row['accuracy'], row['accuracy'])
    return cls(float(row['accuracy']), (float(ci[0]), float(ci[1])), int(row['n']))

  def text(self) -> str:
    lo, hi = self.ci95
    return f'{100 * self.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]'


def versus(a: Measure | None, b: Measure | None, b_name: str) -> str:
  """A claim's cell: 'a [ci]' or 'a [ci] vs <b_name> b [ci]'; '—' without a."""
  if a is None:
    return '—'
  return a.text() + ('' if b is None else f' vs {b_name} {b.text()}')


def counts(*measures: Measure | None) -> str:
  """A claim's n: the distinct example counts of its measures, in the order given."""
  return ' / '.join(dict.fromkeys(str(m.n) for m in measures if m is not None)) or '—'


def compare(a: Measure | None, b: Measure | None) -> str | None:
  """The claim 'a > b': 'holds' when a's interval lies above b's, 'fails' when a <= b,
  'unclear' when a > b but the intervals overlap; None when a number is missing."""
  if a is None or b is None:
    return None
  if a.ci95[0] > b.ci95[1]:
    return 'holds'
  if a.accuracy <= b.accuracy:
    return 'fails'
  return 'unclear'


def comparative_verdict(paper: str | None, adaptive: str | None) -> str:
  """A robustness claim from its comparison under the paper's attack and under the adaptive
  suite (each 'holds' / 'fails' / 'unclear' / None for not run)."""
  if paper is None:
    return NOT_RUN
  if paper == 'fails':
    return NOT_REPRODUCED
  if paper == 'unclear':
    return INCONCLUSIVE
  if adaptive is None:
    return f"{REPRODUCED} under the paper's attack (adaptive suite: {NOT_RUN})"
  return REPRODUCED if adaptive == 'holds' else PAPER_ONLY


def value_verdict(claimed: float, measure: Measure | None,
                  tolerance: float = VALUE_TOLERANCE) -> str:
  """A claimed accuracy is reproduced when it lies in the measured 95% interval or within
  `tolerance` (absolute) of the measured accuracy."""
  if measure is None:
    return NOT_RUN
  lo, hi = measure.ci95
  ok = lo <= claimed <= hi or abs(measure.accuracy - claimed) <= tolerance
  return REPRODUCED if ok else NOT_REPRODUCED


def ece_tolerance(n: int) -> float:
  """How much worse an ECE may be and still count as preserved: max(0.01, 0.3 / sqrt(n))."""
  return max(0.01, 0.3 / math.sqrt(max(n, 1)))


def calibration_verdict(pairs: list[tuple[float | None, float | None, int]]) -> str:
  """'Preserves calibration': every (defended ECE, undefended ECE, n) pair has the
  defended ECE at most ece_tolerance(n) above the undefended one."""
  if not pairs or any(d is None or u is None for d, u, _ in pairs):
    return NOT_RUN
  ok = all(d <= u + ece_tolerance(n) for d, u, n in pairs)
  return REPRODUCED if ok else NOT_REPRODUCED


VERDICT_RULES = f"""Verdict rules (fixed before the runs; every number has its 95% Wilson interval):
- A robustness claim "A is more accurate than B under attack" *holds* under a protocol when
  A's interval lies entirely above B's, *fails* when A's accuracy is at most B's, and is
  *unclear* otherwise. **{REPRODUCED}**: holds under the paper's attack and under the
  adaptive suite's per-example worst case; **{PAPER_ONLY}**: holds under the paper's attack
  but fails or is unclear under the adaptive suite; **{NOT_REPRODUCED}**: fails under the
  paper's attack; **{INCONCLUSIVE}**: unclear under the paper's attack.
- A claimed number is **{REPRODUCED}** when it lies in advdef's 95% interval or within
  {100 * VALUE_TOLERANCE:.0f} points of advdef's accuracy, else **{NOT_REPRODUCED}**.
- "Preserves calibration" is **{REPRODUCED}** when the defended model's ECE (15 bins) is at
  most max(0.01, 0.3/sqrt(n)) above the undefended model's, clean and under the paper's
  attack, else **{NOT_REPRODUCED}**.
- **{NOT_COMPARABLE}**: an absolute number of the paper's full-scale setting (e.g. clean
  accuracy after 150 epochs on 50,000 images) against a smaller-scale run;
  **{NOT_RUN}**: the experiment is not in this scale's list."""
