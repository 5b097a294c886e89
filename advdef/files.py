"""Writing files so that readers never see half of one: atomic bytes, text and JSON.

Every file advdef writes for people or for a resumed run (config.json, report.json,
checkpoint fingerprints, sweep summaries) goes through here: written to a temporary file in
the same directory, fsynced, renamed into place, and the directory fsynced so the rename
survives a power cut. `to_jsonable` turns numpy/jax values and ConfigDicts into plain JSON
(NaN and inf become null, so every file is strict JSON).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_jsonable(obj: Any, *, _where: str = '') -> Any:
  """Converts `obj` to plain JSON types: dict/list/str/int/float/bool/None.

  numpy and jax scalars and arrays become Python numbers and (nested) lists;
  tuples become lists; mapping keys become strings; NaN and +-inf become None;
  ml_collections ConfigDicts (anything with `to_dict`) become dicts.

  Raises:
    TypeError: for an object with no JSON form, naming where in `obj` it sits.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, numbers.Integral):
    return int(obj)
  if isinstance(obj, numbers.Real):
    value = float(obj)
    return value if math.isfinite(value) else None
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v, _where=f'{_where}.{k}' if _where else str(k))
            for k, v in obj.items()}
  if hasattr(obj, 'to_dict') and callable(obj.to_dict):  # ml_collections.ConfigDict.
    return to_jsonable(obj.to_dict(), _where=_where)
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v, _where=f'{_where}[{i}]') for i, v in enumerate(obj)]
  if isinstance(obj, pathlib.PurePath):
    return str(obj)
  if isinstance(obj, np.ndarray) or hasattr(obj, '__array__'):
    # jax arrays land here too; np.asarray fetches them to the host.
    array = np.asarray(obj)
    if array.dtype.kind not in 'biuf':
      raise TypeError(f'{_where or "value"}: cannot write an array of dtype {array.dtype} as JSON; '
                      'convert it to numbers or strings first.')
    if array.ndim == 0:
      return to_jsonable(array.item(), _where=_where)
    return [to_jsonable(v, _where=f'{_where}[{i}]') for i, v in enumerate(array.tolist())]
  raise TypeError(f'{_where or "value"}: cannot write {type(obj).__name__} {obj!r} as JSON; '
                  'convert it to a number, string, list or dict first.')


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` so that readers see either the old file or the new one.

  The bytes go to a temporary file in the same directory (same filesystem, so
  the final rename is atomic), are fsynced, and then os.replace() puts them in
  place. The directory is fsynced afterwards so the rename survives a power cut.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # A dot prefix keeps the temporary file out of globs like '*.json'.
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file 0600; a report should be as readable as any other file.
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, path)
  except BaseException:
    try:
      os.unlink(tmp_name)
    except FileNotFoundError:
      pass
    raise
  _fsync_directory(path.parent)
  return path


def _fsync_directory(directory: pathlib.Path) -> None:
  try:
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:  # Some filesystems do not allow opening directories; durability is best effort.
    return
  try:
    os.fsync(dir_fd)
  except OSError:
    pass
  finally:
    os.close(dir_fd)


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
  """Serializes `obj` (after `to_jsonable`) to strict JSON text ending in a newline."""
  return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + '\n'


def write_json_atomic(path: os.PathLike | str, obj: Any, *, indent: int | None = 2) -> pathlib.Path:
  """Writes `obj` as JSON to `path` atomically.

  Args:
    path: destination file; its directory is created if needed.
    obj: any tree of dicts/lists/tuples/numbers/strings, numpy or jax scalars and
      arrays, or ConfigDicts. NaN and +-inf are written as null.
    indent: JSON indentation (None for a single line).

  Returns:
    The path written.
  """
  # Serialize before touching the filesystem, so a conversion error writes nothing.
  text = dumps_json(obj, indent=indent)
  return write_bytes_atomic(path, text.encode('utf-8'))


def write_text_atomic(path: os.PathLike | str, text: str) -> pathlib.Path:
  """Writes UTF-8 `text` to `path` atomically (see `write_json_atomic`)."""
  return write_bytes_atomic(path, text.encode('utf-8'))
