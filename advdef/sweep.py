"""Config sweeps: python -m advdef.sweep --config=configs/quickstart.py --workdir=DIR [--shard=i/n]

Runs one experiment (advdef.experiment.run) per point of a grid of config overrides, each in
its own sub-workdir named from its overrides (`DIR/learning_rate=0.05,seed=0`), then gathers
the reports into DIR/sweep.json, DIR/sweep.md (one row per point: its overrides, clean
accuracy per defense, worst-case accuracy per defense and epsilon) and DIR/sweep.png.

The grid. A config file defines `get_sweep(arg)` beside `get_config(arg)` (big_vision's
hook; the same `:arg` is passed to both) returning a sweep spec string, or `--sweep=SPEC`
gives one on the command line:

  'product(train.learning_rate=(0.05, 0.1), seed=(0, 1))'   # 4 points, seed varies fastest
  'zip(train.learning_rate=(0.05, 0.1), train.num_epochs=(10, 20))'   # 2 points, paired
  'product(zip(a.b=(1, 2), c=(3, 4)), seed=(0, 1, 2))'       # nested: 6 points
  'seed=(0, 1)'                                              # a bare axis

Each `field=(v1, v2, ...)` lists one value per point (a Python literal tuple; a value may
itself be a tuple, e.g. `eval.epsilons=((0.1,), (0.3,))`). `product` is the Cartesian product
of its terms (the first varies slowest); `zip` pairs terms of equal length. `get_sweep` may
also return a sequence of override dicts, one per point. Specs are plain strings, so the
config stays primitives-only and the sweep is printed, logged and stored in sweep.json
as written.

Behaviour:
  * Before any compute, every point's config is built and validated
    (advdef.experiment.validate_config): an override naming a field the config lacks, a
    value of the wrong type, a zip of unequal lengths, an empty grid, two points with the
    same overrides, or a bad --shard is an error naming it. A sub-workdir whose finished
    report was made with a different config is refused (it would be silently reused).
  * A point whose sub-workdir holds report.json is finished and skipped; an interrupted one
    resumes from its checkpoints (experiment.run), so rerunning the same command after a
    kill completes the sweep. A point that fails (e.g. a diverging learning rate) is
    recorded and the others still run; the command then exits 1.
  * --shard=i/n runs only the points with index % n == i, so n hosts (or n GPUs, one
    process each) split a sweep; the process that finishes the last point writes the
    gathered files, and --gather writes them at any time (unfinished points are listed as
    missing).
  * --list prints the points and their status and exits.
  * With a multi-process JAX runtime (`--config.parallel.distributed=True`, see
    advdef.parallel) every process runs every point together, data parallel, and process 0
    writes the sweep files; --shard is then refused. Shards are for independent processes.

  python -m advdef.sweep --config=configs/quickstart.py:smoke --workdir=/tmp/s --shard=0/2
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
from ml_collections import config_flags

from advdef import config_utils
from advdef import experiment
from advdef import files
from advdef import parallel
from advdef import reporting
from advdef import sweep_summary

FLAGS = flags.FLAGS
REPORT = 'report.json'
POINT_FILE = 'sweep_point.json'
ERROR_FILE = 'sweep_error.txt'
_MAX_NAME = 200  # Bytes; file systems allow 255 per path component.
_SAFE_CHARS = re.compile(r'[^A-Za-z0-9._=,+()\-]')


def _say(fmt: str, *args) -> None:
  # Progress for people watching a long sweep (absl's INFO is silenced for orbax).
  print('[sweep] ' + (fmt % args if args else fmt), file=sys.stderr, flush=True)


class SweepError(ValueError):
  """A bad sweep spec, grid, shard or sub-workdir; raised before any compute."""


_CALL_RE = re.compile(r'^\s*(product|zip)\s*\((.*)\)\s*$', re.S)
_FIELD_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')


def _freeze(value):
  """Lists -> tuples, recursively: config sequences are tuples, and points must hash."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _combine(kind: str, terms: list[list[dict]], text: str) -> list[dict]:
  if kind == 'zip':
    lengths = [len(t) for t in terms]
    if len(set(lengths)) > 1:
      described = ', '.join(f'{"/".join(t[0]) if t and t[0] else "?"}: {len(t)}' for t in terms)
      raise SweepError(f'sweep {text.strip()!r}: zip of unequal lengths ({described} values); '
                       'zip pairs the i-th values of each term, use product for all '
                       'combinations')
    combos = zip(*terms)
  else:
    combos = itertools.product(*terms)
  points = []
  for combo in combos:
    merged: dict[str, Any] = {}
    for part in combo:
      for field, value in part.items():
        if field in merged:
          raise SweepError(f'sweep {text.strip()!r}: {field!r} is set twice in one point')
        merged[field] = value
    points.append(merged)
  return points


def parse_sweep_spec(text: str) -> list[dict[str, Any]]:
  """Parses a sweep spec string into the list of override dicts, one per point.

  Args:
    text: e.g. 'product(train.learning_rate=(0.05, 0.1), seed=(0, 1))'; top-level
      comma-separated terms are combined by product.

  Returns:
    [{'train.learning_rate': 0.05, 'seed': 0}, ...] in sweep order.

  Raises:
    SweepError: naming the malformed part.
  """
  if not isinstance(text, str) or not text.strip():
    raise SweepError(f'sweep spec {text!r} is empty; e.g. "product(seed=(0, 1))"')

  def parse(term: str) -> list[dict]:
    m = _CALL_RE.match(term)
    if m:
      kind, inner = m.group(1), m.group(2)
      parts = [p for p in config_utils.split_top_level(inner, ',') if p.strip()]
      if not parts:
        raise SweepError(f'sweep {term.strip()!r}: {kind}() needs at least one term')
      return _combine(kind, [parse(p) for p in parts], term)
    field, eq, value = term.partition('=')
    field = field.strip()
    if not eq or not _FIELD_RE.match(field):
      raise SweepError(f'sweep term {term.strip()!r}: expected field=(v1, v2, ...), '
                       'product(...) or zip(...)')
    try:
      values = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise SweepError(f'sweep term {term.strip()!r}: {value.strip()!r} is not a Python '
                       'literal tuple (quote strings: ("sgd", "adam"))') from None
    if not isinstance(values, (tuple, list)):
      raise SweepError(f'sweep term {term.strip()!r}: give a tuple of values, one per point, '
                       f'e.g. {field}=({values!r},)')
    if not values:
      raise SweepError(f'sweep term {term.strip()!r}: empty tuple of values')
    return [{field: _freeze(v)} for v in values]

  parts = [p for p in config_utils.split_top_level(text, ',') if p.strip()]
  if len(parts) == 1:
    return parse(parts[0])
  return _combine('product', [parse(p) for p in parts], text)


def expand_sweep(sweep) -> list[dict[str, Any]]:
  """A spec string or a sequence of override dicts -> the list of override dicts."""
  if isinstance(sweep, str):
    points = parse_sweep_spec(sweep)
  elif isinstance(sweep, (list, tuple)) and all(isinstance(p, dict) for p in sweep):
    points = [{str(k): _freeze(v) for k, v in p.items()} for p in sweep]
  else:
    raise SweepError(f'a sweep is a spec string or a sequence of override dicts, got {sweep!r}')
  if not points:
    raise SweepError('the sweep has no points')
  seen = {}
  for i, p in enumerate(points):
    key = tuple(sorted(p.items(), key=lambda kv: kv[0]))
    if key in seen:
      raise SweepError(f'sweep points {seen[key]} and {i} have the same overrides {p}')
    seen[key] = i
  return points


def point_name(overrides: dict[str, Any], short: dict[str, str] | None = None) -> str:
  """The sub-workdir name of a point: 'learning_rate=0.05,seed=0' (file-system safe)."""
  if not overrides:
    return 'base'
  short = short or sweep_summary.short_names(list(overrides))
  name = ','.join(f'{short.get(f, f)}={sweep_summary.format_value(v)}'
                  for f, v in overrides.items())
  name = _SAFE_CHARS.sub('_', name)
  if name.startswith('.'):
    name = '_' + name[1:]
  if len(name.encode()) > _MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    name = name[:_MAX_NAME - 13] + '-' + digest
  return name


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its index, overrides ({field: value}), sub-workdir name, config."""
  index: int
  overrides: dict[str, Any]
  name: str
  config: ml_collections.ConfigDict = dataclasses.field(repr=False, compare=False)


def _valid_fields(node) -> str:
  return ', '.join(sorted(node.keys()))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], *,
                    where: str = 'sweep') -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted-field overrides set; the copy keeps the lock.

  Raises:
    SweepError: for a field the config lacks (listing the valid ones at that level) or a
      value of the wrong type.
  """
  config = copy.deepcopy(config)
  for field, value in overrides.items():
    parts = field.split('.')
    node, path = config, []
    for part in parts[:-1]:
      path.append(part)
      child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(child, ml_collections.ConfigDict):
        level = '.'.join(path[:-1]) or 'the config'
        raise SweepError(f'{where}: override {field!r}: {".".join(path)!r} is not a section of '
                         f'the config; valid fields of {level}: {_valid_fields(node)}')
      node = child
    leaf = parts[-1]
    if leaf not in node:
      level = '.'.join(parts[:-1]) or 'the config'
      raise SweepError(f'{where}: override {field!r} names no field of the config; valid '
                       f'fields of {level}: {_valid_fields(node)}')
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise SweepError(f'{where}: override {field!r} is a section; override its fields '
                       f'({_valid_fields(node[leaf])})')
    try:
      node[leaf] = value  # Item syntax: `values` and `items` are ConfigDict methods.
    except (TypeError, ValueError) as e:
      raise SweepError(f'{where}: override {field}={value!r}: {e}') from None
  return config


def make_points(config: ml_collections.ConfigDict, sweep) -> list[Point]:
  """Expands a sweep against a config: every point's config and unique sub-workdir name."""
  overrides = expand_sweep(sweep)
  fields = list(dict.fromkeys(f for p in overrides for f in p))
  short = sweep_summary.short_names(fields)
  points, names = [], {}
  for i, o in enumerate(overrides):
    name = point_name(o, short)
    if name in names:
      raise SweepError(f'sweep points {names[name]} and {i} get the same sub-workdir name '
                       f'{name!r}; make their values differ in more than punctuation')
    names[name] = i
    points.append(Point(i, o, name, apply_overrides(config, o, where=f'sweep point {name}')))
  return points


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n) with n >= 1 and 0 <= i < n."""
  m = re.fullmatch(r'\s*(-?\d+)\s*/\s*(-?\d+)\s*', str(text))
  if not m:
    raise SweepError(f'--shard={text!r}: expected i/n, e.g. --shard=0/4 (this process runs the '
                     'points whose index % n == i)')
  i, n = int(m.group(1)), int(m.group(2))
  if n < 1:
    raise SweepError(f'--shard={text}: n={n} must be >= 1')
  if not 0 <= i < n:
    raise SweepError(f'--shard={text}: i={i} must be in [0, {n - 1}] (shards are 0-based)')
  return i, n


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def point_status(workdir: str, point: Point) -> str:
  """'done' (report.json present), 'failed' (its last attempt raised), or 'missing'."""
  d = os.path.join(workdir, point.name)
  if os.path.exists(os.path.join(d, REPORT)):
    return 'done'
  if os.path.exists(os.path.join(d, ERROR_FILE)):
    return 'failed'
  return 'missing'


def _check_finished_matches(workdir: str, point: Point) -> None:
  """A finished report made with another config would be reused silently: refuse it."""
  report = _read_json(os.path.join(workdir, point.name, REPORT))
  if not report or not isinstance(report.get('config'), dict):
    return
  old = reporting.flatten_dict(report['config'])
  new = reporting.flatten_dict(files.to_jsonable(point.config))
  # Fields only one side has (a newer advdef added them) are not a difference.
  diff = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
  if diff:
    shown = ', '.join(f'{k}: {old[k]!r} -> {new[k]!r}' for k in diff[:5])
    raise SweepError(f'{os.path.join(workdir, point.name)} holds a finished run of a different '
                     f'config ({shown}{", ..." if len(diff) > 5 else ""}); use another '
                     '--workdir, or delete that sub-workdir to rerun it')


def validate_points(points: Sequence[Point], workdir: str) -> None:
  """Every point's config (experiment.validate_config) and finished sub-workdirs, up front."""
  for p in points:
    try:
      experiment.validate_config(p.config)
    except (ValueError, FileNotFoundError) as e:
      raise SweepError(f'sweep point {p.index} ({p.name}): {e}') from None
    _check_finished_matches(workdir, p)


@dataclasses.dataclass
class SweepResult:
  """What one invocation did: point names run, skipped (finished) and failed, and the
  gathered files written (empty unless the sweep is complete or gather was asked)."""
  ran: list[str]
  skipped: list[str]
  failed: list[str]
  gathered: list[str]


def run_sweep(config: ml_collections.ConfigDict, sweep, workdir: str, *,
              shard: tuple[int, int] = (0, 1), gather: bool = False, progress: bool = False,
              source: str = '', meta: dict[str, Any] | None = None,
              run_fn: Callable | None = None) -> SweepResult:
  """Runs this shard's unfinished points, then gathers when every point is done.

  Args:
    config: the base config (locked ConfigDict); each point overrides some fields.
    sweep: a spec string or a sequence of override dicts (see the module docstring).
    workdir: the sweep directory; point p runs in workdir/<p.name>.
    shard: (i, n): run the points whose index % n == i.
    gather: only gather (run nothing); unfinished points are listed as missing.
    progress: show experiment.run's progress bar.
    source: how the sweep was given (config path, spec), stored in sweep.json.
    meta: more provenance for sweep.json, e.g. {'config_overrides': {...}}.
    run_fn: experiment.run by default (tests may pass a stand-in).

  Returns:
    A SweepResult.

  Raises:
    SweepError: bad spec, grid, override, shard or sub-workdir, before any compute.
  """
  i, n = shard
  parse_shard(f'{i}/{n}')
  if n > 1 and jax.process_count() > 1:
    raise SweepError(f'--shard={i}/{n} with a {jax.process_count()}-process JAX runtime: its '
                     'processes run every point together; shard only independent processes')
  points = make_points(config, sweep)
  # In a multi-process runtime every process runs each point; one writes the sweep files.
  is_main = jax.process_index() == 0
  result = SweepResult([], [], [], [])
  if not gather:
    validate_points(points, workdir)
    mine = [p for p in points if p.index % n == i]
    _say('%d points, shard %d/%d runs %d: %s', len(points), i, n, len(mine),
         ', '.join(p.name for p in mine) or '(none)')
    for p in mine:
      d = os.path.join(workdir, p.name)
      if point_status(workdir, p) == 'done':
        _say('skip %s (finished: %s exists)', p.name, REPORT)
        result.skipped.append(p.name)
        continue
      error_path = os.path.join(d, ERROR_FILE)
      if is_main:
        os.makedirs(d, exist_ok=True)
        files.write_json_atomic(os.path.join(d, POINT_FILE), {
            'index': p.index, 'name': p.name, 'overrides': p.overrides, 'source': source})
        if os.path.exists(error_path):
          os.remove(error_path)
      _say('run %s (point %d of %d)', p.name, p.index + 1, len(points))
      try:
        prepared = experiment.prepare(p.config, d)
        (run_fn or experiment.run)(p.config, d, progress=progress, prepared=prepared)
        result.ran.append(p.name)
      except KeyboardInterrupt:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # One failing point (a diverging learning rate) must not stop the others.
        _say('point %s failed: %s: %s', p.name, type(e).__name__, e)
        if is_main:
          files.write_text_atomic(error_path, f'{type(e).__name__}: {e}\n')
        result.failed.append(p.name)
  if is_main and (gather or all(point_status(workdir, p) == 'done' for p in points)):
    result.gathered = [str(x) for x in write_gather(workdir, points, source=source,
                                                    meta=meta)]
  return result


def gather_points(workdir: str, points: Sequence[Point]) -> list[dict[str, Any]]:
  """One record per point: overrides, status and (when done) its summarized report."""
  records = []
  for p in points:
    status = point_status(workdir, p)
    rec = {'index': p.index, 'name': p.name, 'overrides': p.overrides, 'status': status,
           'workdir': p.name}
    if status == 'done':
      report = _read_json(os.path.join(workdir, p.name, REPORT)) or {}
      rec.update(sweep_summary.summarize_report(report))
    elif status == 'failed':
      with open(os.path.join(workdir, p.name, ERROR_FILE)) as f:
        rec['error'] = f.read().strip()
    records.append(rec)
  return records


def write_gather(workdir: str, points: Sequence[Point], *, source: str = '',
                 meta: dict[str, Any] | None = None) -> list[str]:
  """Writes DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (when a point is done)."""
  os.makedirs(workdir, exist_ok=True)
  records = gather_points(workdir, points)
  written = []
  png = sweep_summary.render_plot(records)
  if png is not None:
    written.append(str(files.write_bytes_atomic(os.path.join(workdir, 'sweep.png'), png)))
  markdown = sweep_summary.render_markdown(records, source=source)
  written.append(str(files.write_text_atomic(os.path.join(workdir, 'sweep.md'), markdown)))
  written.append(str(files.write_json_atomic(os.path.join(workdir, 'sweep.json'), {
      'source': source, **(meta or {}), 'num_points': len(records),
      'num_done': sum(r['status'] == 'done' for r in records), 'points': records})))
  _say('wrote %s', ', '.join(written))
  return written


def load_config_module(config_flag_value: str):
  """'path.py[:arg]' -> (module, arg or None), loaded as ml_collections loads it."""
  path, _, arg = config_flag_value.partition(':')
  spec = importlib.util.spec_from_file_location('advdef_sweep_config', path)
  if spec is None or spec.loader is None:
    raise SweepError(f'--config={config_flag_value}: cannot load {path!r}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (arg or None)


def sweep_from_module(module, arg) -> Any:
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{module.__file__} defines no get_sweep(arg); add one returning a spec '
                     'such as "product(seed=(0, 1))", or pass --sweep=SPEC')
  return module.get_sweep(arg) if arg is not None else module.get_sweep()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # orbax logs dozens of INFO lines per checkpoint; keep the console for progress and errors.
  absl_logging.set_verbosity(absl_logging.WARNING)
  config_value = config_flags.get_config_filename(FLAGS['config'])
  try:
    shard = parse_shard(FLAGS.shard)
    parallel.initialize_distributed(FLAGS.config)  # Multi-host, when the config asks.
    if FLAGS.sweep:
      sweep, source = FLAGS.sweep, FLAGS.sweep
    else:
      module, arg = load_config_module(config_value)
      sweep = sweep_from_module(module, arg)
      source = f'{config_value}: {sweep}' if isinstance(sweep, str) else config_value
    config = FLAGS.config
    if FLAGS.list:
      for p in make_points(config, sweep):
        status = point_status(FLAGS.workdir, p)
        mark = '*' if p.index % shard[1] == shard[0] else ' '
        print(f'{mark} {p.index:4d}  {status:8s} {p.name}')
      return
    overrides = config_flags.get_override_values(FLAGS['config'])
    result = run_sweep(config, sweep, FLAGS.workdir, shard=shard, gather=FLAGS.gather,
                       progress=sys.stderr.isatty(), source=source,
                       meta={'config_overrides': files.to_jsonable(overrides)})
  except (SweepError, ValueError, FileNotFoundError) as e:
    # Bad sweeps and configs fail before any compute: one readable line, no traceback.
    print(f'advdef.sweep: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'advdef.sweep: ran {len(result.ran)}, skipped {len(result.skipped)} finished, '
        f'failed {len(result.failed)}' + (f'; wrote {", ".join(result.gathered)}'
                                          if result.gathered else ''), file=sys.stderr)
  if result.failed:
    sys.exit(1)


def _define_flags():
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         'configs', 'quickstart.py')
  config_flags.DEFINE_config_file('config', default, 'Experiment config file (path[:argument]); '
                                  'its get_sweep(argument) gives the grid.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Sweep directory; point p runs in WORKDIR/<p.name>.',
                      required=True)
  flags.DEFINE_string('shard', '0/1', 'i/n: run only the points whose index % n == i.')
  flags.DEFINE_string('sweep', '', 'A sweep spec overriding the config file\'s get_sweep, '
                      'e.g. "product(seed=(0, 1))".')
  flags.DEFINE_bool('gather', False, 'Only write sweep.json / sweep.md / sweep.png from the '
                    'finished points (run nothing).')
  flags.DEFINE_bool('list', False, 'Print the points (* = in this shard) and their status.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
