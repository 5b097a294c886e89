"""Progress of a long phase for people watching it: what it does, how far, and time left.

On a terminal (stderr a TTY) one line is redrawn in place with a carriage return, at most
every `interval` seconds; elsewhere (CI logs, files) nothing is drawn and only the lines
given to `write` are printed, so a log holds one line per finished unit, not a stream of
redraws. The estimate of the time left is the elapsed time per unit done so far times the
units left; units done without cost (`skip`, e.g. results reused from an earlier run) are
kept out of that rate. Standard library only, so any module can use it.

  with Progress('[eval] attack_suite', unit='rows') as bar:
    for i, row in enumerate(rows):
      bar.update(i, len(rows), row.label, 'attack batch 3/8')
      ...
      bar.write(f'{row.label}: done, {bar.summary(i + 1, len(rows))}')
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO


def format_seconds(seconds: float) -> str:
  """A rough duration for people: '<1 s', '45 s', '12 min', '3.5 h' (seconds below 90)."""
  if seconds < 1:
    return '<1 s'
  if seconds < 90:
    return f'{seconds:.0f} s'
  if seconds < 90 * 60:
    return f'{seconds / 60:.0f} min'
  return f'{seconds / 3600:.1f} h'


class Progress:
  """One updating status line on a terminal, silence elsewhere; see the module docstring.

  Args:
    prefix: the text the line starts with, e.g. '[eval] clean'.
    unit: what `done` and `total` count, shown after them ('rows').
    stream: where to write (default sys.stderr); drawn only when `stream.isatty()`.
    clock: seconds, monotonic (injected by tests).
    interval: the least time between two redraws, in seconds.
    width: the terminal width in characters (default: asked of the terminal); longer lines
      are cut, since a line that wraps can no longer be redrawn in place.
    tty: whether to draw (default: `stream.isatty()`); False keeps a process quiet.
  """

  def __init__(self, prefix: str, *, unit: str = 'rows', stream: TextIO | None = None,
               clock: Callable[[], float] = time.monotonic, interval: float = 0.5,
               width: int | None = None, tty: bool | None = None):
    self.prefix, self.unit = prefix, unit
    self.stream = sys.stderr if stream is None else stream
    isatty = getattr(self.stream, 'isatty', None)
    self.tty = bool(isatty and isatty()) if tty is None else tty
    self.clock, self.interval = clock, interval
    self.width = width
    self.start = clock()
    self.skipped = 0.0
    self._last_draw: float | None = None
    self._shown = 0  # characters of the line now on the terminal; 0 when none is

  def skip(self, units: float = 1.0) -> None:
    """Counts `units` as done at no cost (reused results): they stay out of the rate."""
    self.skipped += units

  def eta(self, done: float, total: float) -> float | None:
    """Seconds left: elapsed seconds per costly unit done so far times the units left; None
    before any costly unit is done. done may be fractional (a unit partly done)."""
    if done >= total:
      return 0.0
    worked = done - self.skipped
    if worked <= 0:
      return None
    return (self.clock() - self.start) / worked * (total - done)

  def summary(self, done: float, total: float) -> str:
    """'5/26 rows, ~12 min left' (no estimate before one costly unit, none when finished)."""
    text = f'{int(done)}/{total} {self.unit}'
    eta = self.eta(done, total)
    if eta:
      text += f', ~{format_seconds(eta)} left'
    return text

  def update(self, done: float, total: float, label: str = '', detail: str = '') -> None:
    """Shows where the phase is: done of total units (fractional while a unit is under way),
    the unit under way (`label`) and where inside it (`detail`, e.g. 'batch 3/8').
    Redrawn at most every `interval` seconds; nothing is written off a terminal."""
    if not self.tty:
      return
    now = self.clock()
    if self._last_draw is not None and now - self._last_draw < self.interval:
      return
    self._last_draw = now
    eta = self.eta(done, total)
    parts = [f'{self.prefix} {int(done)}/{total} {self.unit}', label, detail,
             f'~{format_seconds(eta)} left' if eta else '']
    self._draw(' · '.join(p for p in parts if p))

  def write(self, message: str) -> None:
    """Prints `message` on a line of its own, in place of the status line; the next `update`
    draws a fresh one at once (redrawing the old one would show a finished unit as under way).
    """
    self.clear()
    self.stream.write(message + '\n')
    self.stream.flush()
    self._last_draw = None

  def clear(self) -> None:
    """Removes the status line (the cursor is left at the start of the empty line)."""
    if self._shown:
      self.stream.write('\r' + ' ' * self._shown + '\r')
      self.stream.flush()
    self._shown = 0

  def close(self) -> None:
    self.clear()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _draw(self, line: str) -> None:
    width = self.width or shutil.get_terminal_size(fallback=(120, 24)).columns
    line = line[:max(width - 1, 1)]  # The last column would wrap on some terminals.
    # Spaces blank the rest of a longer previous line (clear() blanks from column 0 again).
    self.stream.write('\r' + line + ' ' * max(self._shown - len(line), 0))
    self.stream.flush()
    self._shown = len(line)
