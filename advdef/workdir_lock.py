"""One run per workdir: a lock file, so a second run cannot interleave checkpoints and reports.

  with workdir_lock.hold(workdir):   # WorkdirInUseError if another live run holds it
    ...

The lock is `<workdir>/.advdef.lock`, a JSON object {host, pid, start_time, token} created
with O_CREAT|O_EXCL, which is atomic on POSIX filesystems: of two runs starting together,
exactly one creates it. It is removed when the block exits (normally, by an exception or by
SystemExit). A lock left by a killed run is taken over, with a warning, when it names this
host and a pid that is no longer alive; a lock from another host cannot be checked and is
refused, with the command to remove it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

LOCK_FILE = '.advdef.lock'
# Held while a stale lock is removed, so that two runs taking it over at once cannot both
# delete it (the second would delete the first's fresh lock) and both run.
_BREAK_SUFFIX = '.break'
# How long to wait for a lock file that is being written or taken over (seconds).
_SETTLE_SECONDS = 2.0

# Locks held by this process (absolute paths): a lock naming our own pid is ours only if
# it is here; otherwise it was left by an earlier process that had the same pid (containers
# restart with the same small pids).
_HELD: set[str] = set()


class WorkdirInUseError(ValueError):
  """Another run holds the workdir's lock (or it cannot be told that it does not)."""


def _now_utc() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def _read(path: pathlib.Path) -> dict[str, Any] | None:
  """The lock's record; None if it is gone or not (yet) a complete JSON object."""
  try:
    record = json.loads(path.read_text(encoding='utf-8'))
  except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return record if isinstance(record, dict) else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # Signal 0: checks that the process exists, sends nothing.
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  except OSError as e:
    return e.errno != errno.ESRCH
  return True


def _is_stale(record: dict[str, Any], path: pathlib.Path) -> bool:
  """True when the record's process is known to be gone: this host, pid not alive (or our
  own pid without our holding it)."""
  if record.get('host') != socket.gethostname():
    return False
  pid = record.get('pid')
  if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
    return False
  if pid == os.getpid():
    return str(path) not in _HELD
  return not _pid_alive(pid)


def _describe(workdir: pathlib.Path, path: pathlib.Path, record: dict[str, Any]) -> str:
  return (f"workdir {workdir} is in use by pid {record.get('pid')} on host "
          f"{record.get('host')} since {record.get('start_time')} (lock file {path})")


def _in_use_message(workdir: pathlib.Path, path: pathlib.Path, record: dict[str, Any]) -> str:
  if record.get('host') != socket.gethostname():
    return (f'{_describe(workdir, path, record)}; advdef cannot check a process on another '
            f'host: if that run is over, remove the lock (rm {path}) and rerun, or use another '
            '--workdir')
  return (f'{_describe(workdir, path, record)}; wait for it or remove the lock if that '
          f'process is gone (rm {path})')


def _create(path: pathlib.Path, record: dict[str, Any]) -> bool:
  """Creates `path` holding `record` if it does not exist; False if it exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(record, f)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    path.unlink(missing_ok=True)
    raise
  return True


def _remove_if_stale(path: pathlib.Path, record: dict[str, Any]) -> str:
  """Deletes the lock if it still holds the stale `record`.

  Returns 'removed'; 'changed' when another run replaced it meanwhile; 'busy' when another
  run is taking it over right now.
  """
  breaker = path.with_name(path.name + _BREAK_SUFFIX)
  if not _create(breaker, {'host': socket.gethostname(), 'pid': os.getpid()}):
    return 'busy'
  try:
    if _read(path) != record:  # Taken over by a run that got here before us.
      return 'changed'
    path.unlink(missing_ok=True)
    return 'removed'
  finally:
    breaker.unlink(missing_ok=True)


def acquire(workdir: os.PathLike | str) -> tuple[pathlib.Path, str]:
  """Takes the workdir's lock (creating the workdir); returns (lock path, our token).

  Raises:
    WorkdirInUseError: a live run holds it, a run on another host may, or the lock file
      cannot be read.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  token = uuid.uuid4().hex
  mine = {'host': socket.gethostname(), 'pid': os.getpid(), 'start_time': _now_utc(),
          'token': token}
  deadline = time.monotonic() + _SETTLE_SECONDS
  while True:
    if _create(path, mine):
      _HELD.add(str(path))
      return path, token
    record = _read(path)
    if record is not None and not _is_stale(record, path):
      raise WorkdirInUseError(_in_use_message(workdir, path, record))
    if record is not None:
      outcome = _remove_if_stale(path, record)
      if outcome == 'removed':
        logging.warning('taking over the stale lock %s of pid %s on host %s (started %s), '
                        'which is no longer running', path, record.get('pid'),
                        record.get('host'), record.get('start_time'))
      if outcome != 'busy':
        continue
    # Being written (created, not yet filled) or being taken over by another run: wait.
    if time.monotonic() > deadline:
      if record is None:
        raise WorkdirInUseError(
            f'workdir {workdir} has a lock file {path} that is not a lock record; if no advdef '
            f'run uses this workdir, remove it (rm {path}) and rerun')
      raise WorkdirInUseError(
          f'{_describe(workdir, path, record)} and another run is taking it over; if none is, '
          f'remove {path.with_name(path.name + _BREAK_SUFFIX)} and rerun')
    time.sleep(0.05)


def release(path: pathlib.Path, token: str) -> None:
  """Removes the lock if it is still ours (someone may have removed it by hand and started
  another run, whose lock must stay)."""
  _HELD.discard(str(path))
  record = _read(path)
  if record is not None and record.get('token') == token:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: os.PathLike | str) -> Iterator[pathlib.Path]:
  """Holds `<workdir>/.advdef.lock` for the block; yields the lock file's path.

  Raises:
    WorkdirInUseError: see `acquire`.
  """
  path, token = acquire(workdir)
  try:
    yield path
  finally:
    release(path, token)


__all__ = ['LOCK_FILE', 'WorkdirInUseError', 'acquire', 'hold', 'release']
