"""Training-time output: scalar metrics (JSONL + TensorBoard), the run's config.json, and a progress bar.

Files written under a run's workdir:

* `metrics.jsonl`: one JSON object per line, `{"step": int, "time": float, <name>: value, ...}`,
  appended and flushed on every write. Non-finite values (NaN, +-inf) are written
  as `null` so the file stays valid JSON for every reader; TensorBoard still gets
  the real value.
* `tensorboard/events.out.tfevents.*`: the same scalars via tensorboardX (no
  TensorFlow needed).
* `config.json`: the flattened config ({"model.name": ..., ...}), written atomically.

Only process 0 writes (`jax.process_index() == 0`); on other processes the
writer is a no-op, so training code can call it unconditionally.

Resuming: a run killed after step s but before its next checkpoint leaves metric
lines for steps > s that the resumed run will write again. `MetricWriter.truncate_after(s)`
drops them (and hides them in TensorBoard) so the final file equals that of an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

from advdef import files
from advdef import reporting

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
TENSORBOARD_DIR = 'tensorboard'


def _scalar(name: str, value: Any) -> int | float:
  """Converts a Python/numpy/jax scalar to int (for ints) or float, on the host."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  try:
    # float() on a jax array waits for the device; callers write metrics only every few steps.
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f'metric {name!r}: expected a scalar number, got {type(value).__name__} '
                    f'{value!r}; reduce arrays to a scalar (e.g. .mean()) before writing.') from None


def _json_value(value: int | float) -> int | float | None:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _process_index() -> int:
  import jax  # Lazy: keeps `import advdef.metric_writers` cheap for notebooks reading files.
  return jax.process_index()


class MetricWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard.

  Example::

    with MetricWriter(workdir) as writer:
      writer.write_hparams(config)
      writer.truncate_after(start_step)   # when resuming from a checkpoint
      writer.write_scalars(step, {'train/loss': loss, 'train/accuracy': acc})
  """

  def __init__(self, workdir: os.PathLike | str, *, tensorboard: bool = True,
               enabled: bool | None = None):
    """Creates the writer.

    Args:
      workdir: the run directory (created if needed).
      tensorboard: also write TensorBoard event files under `<workdir>/tensorboard`.
      enabled: None (default) writes only on process 0; True/False force it.
    """
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = (_process_index() == 0) if enabled is None else bool(enabled)
    self._tensorboard = tensorboard
    self._tb_writer = None
    self._tb_purge_step: int | None = None
    self._file = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      _drop_partial_last_line(self.path)
      self._file = open(self.path, 'a', encoding='utf-8')

  # -- scalars -----------------------------------------------------------

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one line {"step", "time", **scalars} and logs the scalars to TensorBoard.

    Args:
      step: the training step (converted with int()).
      scalars: name -> scalar (Python, numpy or jax; jax values are fetched
        to the host here). Names 'step' and 'time' are reserved.
    """
    if not self.enabled:
      return
    self._require_open()
    step = int(step)
    reserved = {'step', 'time'} & set(scalars)
    if reserved:
      raise ValueError(f'metric names {sorted(reserved)} are reserved for the step and wall time; '
                       'rename them (e.g. "train/step").')
    values = {str(k): _scalar(str(k), v) for k, v in scalars.items()}
    record = {'step': step, 'time': time.time()}
    record.update({k: _json_value(v) for k, v in values.items()})
    # One write() per line, so a kill leaves at most one partial last line.
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()
    tb = self._tb()
    if tb is not None:
      for name, value in values.items():
        tb.add_scalar(name, value, global_step=step)

  def write_hparams(self, config: Any) -> pathlib.Path | None:
    """Writes the config, nested as given, to `<workdir>/config.json` (atomically).

    It stays nested so `advdef.load_run` rebuilds the ConfigDict from it; TensorBoard's text
    tab gets the flattened key/value table.

    Args:
      config: a (nested) dict or ml_collections ConfigDict.

    Returns:
      The path written, or None on processes other than 0.
    """
    if not self.enabled:
      return None
    if hasattr(config, 'to_dict'):
      config = config.to_dict()
    flat = reporting.flatten_dict(config)
    path = files.write_json_atomic(self.workdir / CONFIG_FILE, config)
    tb = self._tb()
    if tb is not None:
      # A Markdown table in the TEXT tab: the config sits next to the curves it produced.
      table = reporting.format_table([[k, files.dumps_json(v, indent=None).strip()]
                                      for k, v in flat.items()], ['key', 'value'])
      tb.add_text('config', table, global_step=0)
    return path

  # -- resuming ------------------------------------------------------------

  def truncate_after(self, step: int) -> None:
    """Drops metric lines with step > `step` (left by an interrupted run).

    Call this when resuming from a checkpoint at `step`, before writing. The
    file is rewritten atomically. TensorBoard events of later steps cannot be
    removed from existing event files; instead the next event file starts with
    a purge marker that makes TensorBoard hide them.
    """
    if not self.enabled:
      return
    self._require_open()
    self._file.close()
    truncate_metrics_after(self.workdir, step)
    self._file = open(self.path, 'a', encoding='utf-8')
    if self._tensorboard:
      self._tb_purge_step = int(step) + 1
      if self._tb_writer is not None:
        # The purge marker is written when a SummaryWriter opens, so start a new one.
        self._tb_writer.close()
        self._tb_writer = None

  # -- lifecycle -------------------------------------------------------------

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb_writer is not None:
      self._tb_writer.flush()

  def close(self) -> None:
    """Flushes and closes the files; idempotent."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb_writer is not None:
      self._tb_writer.close()
      self._tb_writer = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _require_open(self) -> None:
    if self._file is None:
      raise RuntimeError(f'MetricWriter for {self.workdir} is closed; create a new one.')

  def _tb(self):
    if not self._tensorboard:
      return None
    if self._tb_writer is None:
      # Created on first use so that truncate_after() can still set purge_step.
      from tensorboardX import SummaryWriter  # Lazy: only runs that log need it.
      self._tb_writer = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR),
                                      purge_step=self._tb_purge_step, flush_secs=30)
      self._tb_purge_step = None
    return self._tb_writer


# ----------------------------------------------------------------------------
# Reading and rewriting metrics.jsonl.


def _drop_partial_last_line(path: pathlib.Path) -> None:
  """Cuts a trailing line without newline (a write cut short by a kill).

  Without this, the next appended line would be glued onto the fragment and
  both would be lost to readers.
  """
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    return
  if size == 0:
    return
  with open(path, 'rb+') as f:
    f.seek(size - 1)
    if f.read(1) == b'\n':
      return
    # Files are small (one line per logged step), so reading them whole is fine.
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b'\n') + 1)


def _parse_lines(path: pathlib.Path) -> list[dict[str, Any]]:
  with open(path, 'rb') as f:
    lines = [(i + 1, line) for i, line in enumerate(f.read().split(b'\n')) if line.strip()]
  rows = []
  for k, (lineno, line) in enumerate(lines):
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get('step'), int):
        raise ValueError('not a metrics record')
    except ValueError:
      if k == len(lines) - 1:
        break  # Only the last line can be partial (a kill mid-write): skip it.
      raise ValueError(f'{path}:{lineno} is not a metrics record ({line[:80]!r}); the file is '
                       'corrupted in the middle, which a kill cannot cause. Delete or repair '
                       'that line.') from None
    rows.append(row)
  return rows


def read_metrics(workdir: os.PathLike | str) -> list[dict[str, Any]]:
  """Reads `<workdir>/metrics.jsonl` into a list of dicts, in file order.

  A truncated last line (a process killed mid-write) is skipped. Non-finite
  values come back as None.

  Returns:
    The records; an empty list if the file does not exist.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return _parse_lines(path)


def truncate_metrics_after(workdir: os.PathLike | str, step: int) -> int:
  """Rewrites `<workdir>/metrics.jsonl` atomically, keeping only lines with step <= `step`.

  Returns:
    The number of records dropped.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return 0
  rows = _parse_lines(path)
  kept = [r for r in rows if r['step'] <= int(step)]
  text = ''.join(json.dumps(r, allow_nan=False) + '\n' for r in kept)
  files.write_text_atomic(path, text)
  return len(rows) - len(kept)


# ----------------------------------------------------------------------------
# Progress bar.


class ProgressBar:
  """A tqdm progress bar on stderr for the training loop.

  Shows step count, ETA, and throughput in images/s (steps/s times
  `batch_size`). It never touches device values itself: pass host numbers in
  `update(**postfix)` (formatting a jax array there would wait for the device).
  Disabled when stderr is not a terminal or `enabled=False`.
  """

  def __init__(self, total: int, *, initial: int = 0, batch_size: int | None = None,
               desc: str = 'train', enabled: bool = True):
    """Creates the bar.

    Args:
      total: the final step.
      initial: the step training starts from (non-zero when resuming).
      batch_size: global batch size; enables the images/s readout.
      desc: label shown before the bar.
      enabled: False turns the bar off (tests, non-primary processes).
    """
    from tqdm import tqdm  # Lazy: only training needs it.
    self.batch_size = batch_size
    self.enabled = bool(enabled) and sys.stderr.isatty()
    self._postfix: dict[str, Any] = {}
    self._bar = tqdm(total=int(total), initial=int(initial), desc=desc, unit='step',
                     file=sys.stderr, disable=not self.enabled, dynamic_ncols=True,
                     smoothing=0.1)

  def update(self, n: int = 1, **postfix: Any) -> None:
    """Advances the bar by `n` steps and replaces the postfix values given."""
    if not self.enabled:
      return
    if postfix:
      self._postfix.update(postfix)
    rate = self._bar.format_dict.get('rate')  # tqdm's smoothed steps/s, None until measured.
    if self.batch_size and rate:
      self._postfix['img/s'] = f'{rate * self.batch_size:,.0f}'
    if self._postfix:
      self._bar.set_postfix(self._postfix, refresh=False)
    self._bar.update(n)

  def write(self, message: str) -> None:
    """Prints a line without breaking the bar."""
    if self.enabled:
      self._bar.write(message, file=sys.stderr)
    else:
      print(message, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


__all__ = ['CONFIG_FILE', 'METRICS_FILE', 'TENSORBOARD_DIR', 'MetricWriter', 'ProgressBar',
           'read_metrics', 'truncate_metrics_after']
