"""Checkpoints of training state, as a thin wrapper over orbax-checkpoint.

All orbax calls of the package live here, so orbax API changes touch one file.

Layout of `<workdir>/checkpoints`::

  fingerprint.json        what the checkpoints belong to (model, dataset, ...)
  <step>/                 one finished checkpoint per kept step
  <step>.orbax-checkpoint-tmp/   a save in progress (or cut short by a crash)

Atomicity: orbax (0.12.8, local filesystem) writes each step into
`<step>.orbax-checkpoint-tmp`, writes `commit_success.txt` into it, and only
then renames it to `<step>` (`AtomicRenameTemporaryPath`, the default for
non-GCS paths). A rename is atomic on POSIX, and orbax lists only directories
whose names parse as steps, so a save killed at any moment leaves either no
`<step>` directory or a complete one; `latest_step`/`restore` never see a
half-written checkpoint. Leftover temporary directories are deleted when the
next Checkpointer opens the directory (`cleanup_tmp_directories=True`).
Deleting old steps (keep-last-N, or an unreadable step in `restore_latest`) is
a rename too: orbax moves `<step>` into `deleted_steps/` (`todelete_subdir`),
and the Checkpointer empties that folder when it opens, after each save and on close.
orbax's own deletion unlinks a step's files one by one, so a kill in the middle
left a listed step without its metadata that failed to restore (seen once in
CI's kill -9 test); now every listed step is complete, and a kill while
emptying the trash leaves only files that nothing lists.

Damage after the commit (a full disk, a copy or sync cut short, files truncated) is not
prevented by any of this: `Checkpointer.restore_latest` and `restore_variables` then warn and
fall back to the newest checkpoint that reads back, and fail with one line when none does.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from advdef import files

FINGERPRINT_FILE = 'fingerprint.json'
# Steps to delete are renamed into this folder first (atomic), then removed from it.
DELETED_STEPS_DIR = 'deleted_steps'


class CheckpointsUnreadableError(ValueError):
  """The directory holds checkpoints but none of them could be restored."""


def _brief(error: BaseException) -> str:
  """One line for an exception: its type and the first line of its message."""
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  if len(text) > 200:
    text = text[:197] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _restore_newest_readable(directory: pathlib.Path, steps, restore_one, *,
                             advice: str) -> tuple[int, Any, list[int]]:
  """Restores the newest of `steps` that reads back, warning about each one that does not.

  A committed checkpoint can still be damaged afterwards (a full disk, a copy or sync cut
  short, files truncated by hand); orbax then fails with whatever the damaged file gives
  (JSON errors, missing files, shape mismatches). Any exception counts as unreadable.

  Returns:
    (step restored, the restored tree, the unreadable steps newer than it).

  Raises:
    CheckpointsUnreadableError: none could be read; `advice` says what to do.
  """
  failures = []
  newest_first = sorted(steps, reverse=True)
  for i, step in enumerate(newest_first):
    try:
      restored = restore_one(step)
    except Exception as e:  # pylint: disable=broad-except  # noqa: BLE001 (see docstring)
      failures.append((step, e))
      logging.warning('checkpoint step %d (%s) could not be read (%s)%s', step,
                      directory / str(step), _brief(e),
                      f'; trying step {newest_first[i + 1]}' if i + 1 < len(newest_first) else '')
      continue
    return step, restored, [s for s, _ in failures]
  newest, error = failures[0]
  raise CheckpointsUnreadableError(
      f'none of the checkpoints in {directory} could be read (steps '
      f'{sorted(s for s, _ in failures)}; step {newest}: {_brief(error)}); {advice}')


def _normalize(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
  # Compare in JSON form: a tuple in the config and the list read back from disk are equal.
  return json.loads(files.dumps_json(dict(fingerprint)))


def _describe(fingerprint: Mapping[str, Any]) -> str:
  parts = []
  if 'model' in fingerprint:
    parts.append(f"model {fingerprint['model']!r}")
  if 'dataset' in fingerprint:
    parts.append(f"on {fingerprint['dataset']!r}")
  return ' '.join(parts) if parts else json.dumps(fingerprint, sort_keys=True)


def _mismatch_message(directory: pathlib.Path, stored: Mapping[str, Any],
                      wanted: Mapping[str, Any]) -> str:
  differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
  details = ', '.join(f'{k}: {stored.get(k)!r} stored vs {wanted.get(k)!r} asked' for k in differing)
  return (f'workdir {directory.parent} holds checkpoints of {_describe(stored)}; this config asks '
          f'for {_describe(wanted)} (differs in {details}). Use a new --workdir or delete '
          f'{directory}.')


def _read_fingerprint(directory: pathlib.Path) -> dict[str, Any] | None:
  path = directory / FINGERPRINT_FILE
  try:
    text = path.read_text(encoding='utf-8')
  except FileNotFoundError:
    return None
  try:
    stored = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); it should have been written atomically, so '
                     'something else modified it. Delete it to adopt the checkpoints for the '
                     'current config, or use a new --workdir.') from None
  if not isinstance(stored, dict):
    raise ValueError(f'{path} should hold a JSON object, found {type(stored).__name__}; delete it '
                     'or use a new --workdir.')
  return stored


def _abstract_target(target: Any) -> Any:
  """Replaces jax arrays by ShapeDtypeStructs that keep their sharding.

  Restoring into concrete arrays would also work, but going through the
  abstract form means the target's buffers are not needed (and could be
  donated or freed) and orbax allocates each restored array directly with
  the target's sharding. numpy leaves are passed through and come back as
  numpy; ShapeDtypeStructs come back as jax arrays on their sharding, or on the
  first local device when their sharding is None.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def convert(leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      # Without a sharding, orbax's partial-restore path returns numpy; pin jax.eval_shape
      # outputs to the default device so every restore path gives jax arrays.
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)
    return leaf
  return jax.tree.map(convert, target)


class Checkpointer:
  """Saves and restores training state under `<workdir>/checkpoints`.

  Example::

    ckpt = Checkpointer(workdir / 'checkpoints', keep=3, save_interval_steps=1000,
                        fingerprint={'model': 'lenet_like', 'dataset': 'npz:mnist10k'})
    ckpt.check_compatible()
    step, state = ckpt.restore_latest(target=state)  # (None, state) when there is none
    for step in range(step or 0, num_steps):
      state = train_step(state, batch)
      ckpt.save(step + 1, state)
    ckpt.save(num_steps, state, force=True)
    ckpt.close()
  """

  def __init__(self, directory: os.PathLike | str, *, keep: int | None = 3,
               save_interval_steps: int = 1, fingerprint: Mapping[str, Any],
               async_save: bool = False):
    """Opens (and creates if needed) a checkpoint directory.

    Args:
      directory: `<workdir>/checkpoints`.
      keep: how many of the most recent checkpoints to keep; None keeps all.
      save_interval_steps: `save` writes only at steps divisible by this
        (unless `force=True`).
      fingerprint: JSON-able description of what the checkpoints belong to,
        e.g. {'model': ..., 'dataset': ..., 'num_classes': ..., 'image_shape': ...}.
        Written to `fingerprint.json` the first time; `check_compatible`
        compares against it.
      async_save: write checkpoints in a background thread; `save` then
        returns once the arrays are copied off the device. Call `wait()`
        before reading the files from elsewhere.
    """
    if keep is not None and (not isinstance(keep, int) or keep < 1):
      raise ValueError(f'keep must be a positive int or None (keep all), got {keep!r}')
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f'save_interval_steps must be a positive int, got {save_interval_steps!r}')
    if not isinstance(fingerprint, Mapping):
      raise TypeError(f'fingerprint must be a dict, got {type(fingerprint).__name__}')
    # orbax wants absolute paths; resolving here also makes error messages unambiguous.
    self.directory = pathlib.Path(directory).absolute()
    self.fingerprint = _normalize(fingerprint)
    self._checked = False
    options = ocp.CheckpointManagerOptions(
        # The policy objects replace the deprecated max_to_keep / save_interval_steps fields.
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        todelete_subdir=DELETED_STEPS_DIR,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._empty_deleted_steps()
    if jax.process_index() == 0 and _read_fingerprint(self.directory) is None:
      files.write_json_atomic(self.directory / FINGERPRINT_FILE, self.fingerprint)

  def _empty_deleted_steps(self) -> None:
    """Removes the steps orbax renamed into `deleted_steps/` (see the module docstring).

    Only the children are removed, never the folder itself: an async save's finalizer
    may be renaming the next old step into it at the same time.
    """
    trash = self.directory / DELETED_STEPS_DIR
    if jax.process_index() != 0 or not trash.is_dir():
      return
    for step_dir in trash.iterdir():  # orbax puts only step folders here.
      shutil.rmtree(step_dir, ignore_errors=True)

  def check_compatible(self) -> None:
    """Raises ValueError if the directory's stored fingerprint differs from ours.

    All keys are compared; the message names the stored and the requested
    model and dataset and lists every differing key.
    """
    stored = _read_fingerprint(self.directory)
    if stored is not None and stored != self.fingerprint:
      raise ValueError(_mismatch_message(self.directory, stored, self.fingerprint))
    self._checked = True

  def _ensure_compatible(self) -> None:
    # save/restore check too, so forgetting check_compatible() cannot mix runs.
    if not self._checked:
      self.check_compatible()

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None if there is none.

    With `async_save=True` this may name a step whose save is still being
    finalized; `restore` waits for it.
    """
    return self._manager.latest_step()

  def restore_latest(self, *, target: Any) -> tuple[int | None, Any]:
    """Restores the newest checkpoint that can be read, skipping damaged newer ones.

    Each unreadable checkpoint is reported with a warning naming its step and path. When
    an older one restores, the unreadable newer ones are deleted, so that resumed training
    writes those steps again (`save` skips a step that exists). When none restores nothing
    is deleted: the same failure on every step may mean that the model changed, not the
    files.

    Args:
      target: as for `restore`.

    Returns:
      (step, restored pytree), or (None, target) when there is no checkpoint.

    Raises:
      CheckpointsUnreadableError: there are checkpoints but none could be read.
    """
    self._ensure_compatible()
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      return None, target
    abstract = _abstract_target(target)
    step, restored, unreadable = _restore_newest_readable(
        self.directory, steps,
        lambda s: self._manager.restore(s, args=ocp.args.StandardRestore(abstract)),
        advice=f'delete {self.directory} to train from scratch, or use another --workdir '
        '(if the model config changed since they were written, rerun with the old one)')
    for bad in unreadable:
      self._manager.delete(bad)
    if unreadable:
      self._empty_deleted_steps()
      logging.warning('resuming from checkpoint step %d in %s; deleted the unreadable newer '
                      'checkpoints %s so that training writes them again', step, self.directory,
                      unreadable)
    return step, restored

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` as checkpoint `step` if the save interval says so.

    Args:
      step: the training step (a Python or 0-d array integer).
      state: any pytree of jax/numpy arrays, e.g. a flax.struct TrainState.
      force: save even when `step` is not a multiple of `save_interval_steps`
        (e.g. the final step).

    Returns:
      True if a checkpoint was written (or, with async_save, started); False if
      skipped by the interval or because `step` is already saved.
    """
    self._ensure_compatible()
    step = int(step)
    if step in self._manager.all_steps():
      # A forced final save often lands on a step the interval already saved.
      return False
    saved = bool(self._manager.save(step, args=ocp.args.StandardSave(state), force=force))
    if saved:  # With async_save, the steps this save drops are emptied by the next one or close.
      self._empty_deleted_steps()
    return saved

  def restore(self, step: int | None = None, *, target: Any) -> Any:
    """Restores checkpoint `step` (default: latest) into the structure of `target`.

    Args:
      step: the step to restore, or None for the latest.
      target: a pytree of the same structure as what was saved; leaves may be
        jax arrays, numpy arrays or jax.ShapeDtypeStructs. The result has the
        target's tree type, dtypes and shardings.

    Returns:
      The restored pytree.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
    """
    self._ensure_compatible()
    self._manager.wait_until_finished()
    available = self.all_steps()
    if step is None:
      if not available:
        raise FileNotFoundError(f'no checkpoint in {self.directory} to restore; train first or '
                                'point --workdir at a run that has checkpoints.')
      step = available[-1]
    step = int(step)
    if step not in available:
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; available '
                              f'steps: {available}.')
    return self._manager.restore(step, args=ocp.args.StandardRestore(_abstract_target(target)))

  def wait(self) -> None:
    """Blocks until any background save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources; idempotent."""
    if self._manager is not None:
      self._manager.close()
      self._manager = None
      self._empty_deleted_steps()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _resolve_checkpoint_dir(directory: os.PathLike | str) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  if not (directory / FINGERPRINT_FILE).exists() and (directory / 'checkpoints').is_dir():
    return directory / 'checkpoints'  # A workdir was given.
  return directory


def restore_variables(directory: os.PathLike | str, target: Mapping[str, Any], *,
                      step: int | None = None,
                      expected_fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Loads model variables (e.g. params and batch_stats) from a training checkpoint.

  Only the top-level entries named in `target` are read, so the optimizer
  state of a training checkpoint is never loaded.

  Args:
    directory: `<workdir>/checkpoints` or the workdir itself.
    target: e.g. {'params': ..., 'batch_stats': ...} with the structure, dtypes
      and shardings wanted (arrays or jax.ShapeDtypeStructs).
    step: the step to load; None loads the latest that can be read (a damaged newer one
      is skipped with a warning).
    expected_fingerprint: if given, the stored fingerprint must equal it.

  Returns:
    A dict with the same keys and structure as `target`.

  Raises:
    FileNotFoundError: if the directory holds no (such) checkpoint.
    CheckpointsUnreadableError (a ValueError): if none of the candidates could be read.
    ValueError: if the fingerprint does not match.
  """
  directory = _resolve_checkpoint_dir(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'checkpoint directory {directory} does not exist; check the path '
                            'given in the config.')
  if expected_fingerprint is not None:
    stored = _read_fingerprint(directory)
    wanted = _normalize(expected_fingerprint)
    if stored is not None and stored != wanted:
      raise ValueError(_mismatch_message(directory, stored, wanted))
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    available = sorted(manager.all_steps())
    if not available:
      raise FileNotFoundError(f'no checkpoint in {directory}; train first or fix the path.')
    if step is not None and int(step) not in available:
      raise FileNotFoundError(f'no checkpoint for step {step} in {directory}; available steps: '
                              f'{available}.')
    abstract = _abstract_target(dict(target))
    # PyTreeRestore with partial_restore reads only the named subtrees; StandardRestore would
    # insist on the full saved structure including opt_state.
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)
    # The latest readable one: a damaged newest checkpoint falls back, with a warning; an
    # explicit step is that step or an error. Nothing is deleted here: the run is not ours.
    _, restored, _ = _restore_newest_readable(
        directory, available if step is None else [int(step)],
        lambda s: manager.restore(s, args=args),
        advice='point train.checkpoint (or train.init_from) at another run, or delete '
        f'{directory} and train that run again')
  return dict(restored)


__all__ = ['FINGERPRINT_FILE', 'Checkpointer', 'CheckpointsUnreadableError', 'restore_variables']
