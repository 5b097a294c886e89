"""Finished evaluator results on disk, so that a rerun skips the work already done.

Each finished unit of work is one small JSON file in <workdir>/eval_results/, written
atomically (advdef.files) as soon as it is finished:

  clean-<d>-<hash>.json                 the clean row of defense d (eval.defenses[d])
  attack_suite-<d>-<a>-<e>-<hash>.json  the row of defense d, attack plan a, epsilon e, with
                                        its per-example correctness (bool[n], base64)
  checks-<d>-<hash>.json                the sanity checks of defense d
  defense_sweep-<hash>.json, model_summary-<hash>.json   the whole section

An entry's name hashes everything that determines it: the evaluator, its index and key fields
(defense spec, attack label and kwargs, epsilon) and the run's fingerprint, a hash of
config.eval (eval.evaluators excepted: evaluators share nothing), config.data, config.model,
config.seed, the evaluated images and labels, the bytes of the trained variables, and the
advdef and JAX versions. Other weights or another eval config find no entry and compute
afresh. An entry also holds the PRNG keys that made it (key data, lists of ints), and is
reused only when the rerun would use the same keys.

Only process 0 writes (ctx.workdir is None elsewhere). In a multi-process run process 0
reads each entry and broadcasts it, so that every process skips the same work: one process
computing what another skips would wait forever in its collectives. Without a workdir on
process 0 (notebooks, tests calling evaluators) nothing is stored or reused.

  store = results.open_store(ctx)
  entry = store.get('clean', (d,), {'defense': spec}, {'score': key})
  if entry is None:
    entry = store.put('clean', (d,), {'defense': spec}, {'score': key}, row)
  row = entry.value   # as a rerun reads it back (JSON types), so both runs' rows are equal
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from advdef import config_utils
from advdef import files
from advdef import version
from advdef.evaluators import base

RESULTS_DIR = 'eval_results'
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Entry:
  """A stored result: value (JSON types) and named arrays (e.g. 'correct': bool[n])."""
  value: Any
  arrays: dict[str, np.ndarray]


def key_data(key) -> list[int]:
  """A PRNG key (typed or raw uint32) as a flat list of ints, for storing and comparing."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key).ravel()]


def _canonical(obj: Any) -> bytes:
  return json.dumps(files.to_jsonable(obj), sort_keys=True, allow_nan=False).encode()


def run_fingerprint(ctx: base.Context) -> str:
  """sha256 hex of what every result of this evaluation depends on (module docstring)."""
  config = ctx.config
  eval_section = config_utils.to_dict(config.eval)
  eval_section.pop('evaluators', None)
  h = hashlib.sha256(_canonical({
      'advdef': version.__version__, 'jax': jax.__version__, 'seed': config.seed,
      'data': config_utils.to_dict(config.data), 'model': config_utils.to_dict(config.model),
      'eval': eval_section}))
  arrays = {'images': ctx.images, 'labels': ctx.labels, 'variables': ctx.variables}
  for path, leaf in jax.tree_util.tree_leaves_with_path(arrays):
    # Replicated variables read back from one local copy, no collective needed.
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _encode_array(a) -> dict[str, Any]:
  a = np.ascontiguousarray(np.asarray(a))
  return {'dtype': a.dtype.str, 'shape': list(a.shape),
          'base64': base64.b64encode(a.tobytes()).decode('ascii')}


def _decode_array(d) -> np.ndarray:
  raw = base64.b64decode(d['base64'])
  return np.frombuffer(raw, np.dtype(d['dtype'])).reshape(d['shape']).copy()


def _agree(payload: bytes | None) -> bytes | None:
  """Process 0's payload on every process (the same skip decisions everywhere)."""
  if jax.process_count() == 1:
    return payload
  from jax.experimental import multihost_utils  # Only multi-process runs need it.
  length = -1 if payload is None else len(payload)
  length = int(multihost_utils.broadcast_one_to_all(np.int32(length)))
  if length < 0:
    return None
  data = (np.frombuffer(payload, np.uint8) if payload is not None and jax.process_index() == 0
          else np.zeros(length, np.uint8))
  return np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes()


class Store:
  """Entries of one evaluation; see the module docstring.

  Args:
    directory: <workdir>/eval_results on process 0; None elsewhere.
    fingerprint: run_fingerprint(ctx) on process 0; None elsewhere.
    active: whether process 0 stores (False: get finds nothing, put stores nothing and
      returns its arguments unchanged, exactly as without a store).
  """

  def __init__(self, directory: str | None, fingerprint: str | None, *, active: bool):
    self.directory, self.fingerprint, self.active = directory, fingerprint, active

  def path(self, evaluator: str, index: tuple[int, ...], key: dict[str, Any]) -> str:
    """The entry's file: <directory>/<evaluator>-<index...>-<hash>.json."""
    digest = hashlib.sha256(_canonical({'evaluator': evaluator, 'index': list(index),
                                        'key': key, 'fingerprint': self.fingerprint}))
    name = '-'.join([evaluator, *map(str, index), digest.hexdigest()[:16]]) + '.json'
    return os.path.join(self.directory, name)

  def get(self, evaluator: str, index: tuple[int, ...], key: dict[str, Any],
          prng: dict[str, Any], check=None) -> Entry | None:
    """The stored entry, or None when there is none (or it was made with other PRNG keys).

    key: JSON-able fields that determine the entry; prng: name -> the PRNG key this run
    would use for it; check(entry) -> False refuses an entry (e.g. a file it names is gone).
    Every process must call it at the same point (multi-process runs).
    """
    if not self.active:
      return None
    payload = self._read(evaluator, index, key, prng) if self.directory else None
    if payload is not None and check is not None and not check(_decode(payload)):
      payload = None
    payload = _agree(payload)
    return None if payload is None else _decode(payload)

  def put(self, evaluator: str, index: tuple[int, ...], key: dict[str, Any],
          prng: dict[str, Any], value: Any, arrays: dict[str, Any] | None = None) -> Entry:
    """Stores a finished entry (process 0, atomically) -> it as a rerun would read it."""
    arrays = arrays or {}
    if not self.active:
      return Entry(value, arrays)
    text = files.dumps_json({
        'format': FORMAT, 'evaluator': evaluator, 'index': list(index), 'key': key,
        'fingerprint': self.fingerprint, 'prng': {k: key_data(v) for k, v in prng.items()},
        'value': value, 'arrays': {k: _encode_array(v) for k, v in arrays.items()}},
        indent=None)
    if self.directory:
      files.write_text_atomic(self.path(evaluator, index, key), text)
    return _decode(text.encode())

  def _read(self, evaluator, index, key, prng) -> bytes | None:
    path = self.path(evaluator, index, key)
    try:
      with open(path, 'rb') as f:
        payload = f.read()
    except FileNotFoundError:
      return None
    name = os.path.basename(path)
    try:
      record = json.loads(payload)
      same = (record['format'] == FORMAT and record['fingerprint'] == self.fingerprint and
              record['evaluator'] == evaluator and record['index'] == list(index) and
              record['key'] == files.to_jsonable(key))
      stored_prng = record['prng']
      _decode(payload)
    except (ValueError, KeyError, TypeError) as err:
      base.log(f'{RESULTS_DIR}/{name} is unreadable ({err}); recomputing it')
      return None
    if not same:
      return None
    if stored_prng != {k: key_data(v) for k, v in prng.items()}:
      base.log(f'{RESULTS_DIR}/{name} was made with other PRNG keys; recomputing it')
      return None
    return payload


def _decode(payload: bytes) -> Entry:
  record = json.loads(payload)
  return Entry(record['value'], {k: _decode_array(v) for k, v in record['arrays'].items()})


def open_store(ctx: base.Context) -> Store:
  """The run's store: <ctx.workdir>/eval_results, inactive when process 0 has no workdir."""
  directory = os.path.join(ctx.workdir, RESULTS_DIR) if ctx.workdir else None
  active = directory is not None
  if jax.process_count() > 1:  # Process 0 decides for every process.
    active = _agree(b'1' if active else None) is not None
  if not active:
    return Store(None, None, active=False)
  fingerprint = None
  if directory is not None:
    if 'results_fingerprint' not in ctx.memo:  # Hashing the variables once per run.
      ctx.memo['results_fingerprint'] = run_fingerprint(ctx)
    fingerprint = ctx.memo['results_fingerprint']
  return Store(directory, fingerprint, active=True)
