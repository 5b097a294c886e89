"""Entry point: python -m advdef.main --config=configs/quickstart.py --workdir=/tmp/qs

Trains (resuming from the workdir's latest checkpoint, or loading `train.checkpoint`),
evaluates every configured defense and attack, and writes report.json, report.md and plots
to the workdir. Any config field can be overridden: --config.train.num_epochs=3.

Data parallel over all devices by default (`--config.parallel.num_devices=N` for fewer);
multi-host runs start the same command on every host with
`--config.parallel.distributed=True` (see advdef.parallel and the README's "Scaling out").

One run per workdir: a second run on a workdir in use exits naming the holder (host, pid,
start time; advdef.workdir_lock). Errors in flags, config and inputs are one line on stderr
(`advdef: error: ...`, exit code 2), a misspelt --config field with the closest valid ones.
"""

import contextlib
import difflib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'quickstart.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                          'Experiment config file (path[:argument]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the '
                               'report.', required=True)
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None, "JAX's persistent compilation cache directory; 'off' turns it "
    'off. Default: $ADVDEF_COMPILATION_CACHE, else $XDG_CACHE_HOME/advdef/jax, else '
    '~/.cache/advdef/jax (see advdef.compilation). Reruns then skip compiling.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                                 '(multi-host runs); the same as '
                                 '--config.parallel.distributed=True.')


def _config_argument(argv: list[str]) -> str:
  """The --config value in argv (the last one given), else the default."""
  value = _DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], 1):
    if re.fullmatch(r'--?config', arg) and i + 1 < len(argv):
      value = argv[i + 1]
    elif match := re.match(r'--?config=(.*)', arg, re.S):
      value = match.group(1)
  return value


def _unknown_field(config, path: str) -> str | None:
  """The error for an override path that names no field of `config`; None if it does."""
  node, walked = config, ''
  for part in path.split('.'):
    name = part.split('[', 1)[0]  # eval.epsilons[0]: the field is eval.epsilons.
    if not isinstance(node, ml_collections.ConfigDict):
      return f'config field {walked} is a {type(node).__name__}, so it has no field {name}'
    if name not in node:
      keys = sorted(node.keys())
      prefix = f'{walked}.' if walked else ''
      close = difflib.get_close_matches(name, keys, n=3)
      if close:
        hint = 'did you mean ' + ' or '.join(prefix + c for c in close) + '?'
      else:
        hint = f'valid fields{" of " + walked if walked else ""}: {", ".join(keys)}'
      return f'unknown config field {prefix}{name}; {hint}'
    node = node[name]
    walked = f'{walked}.{part}' if walked else part
  return None


def _override_error(argv: list[str], error: BaseException) -> str:
  """One line for a --config.<field> override that failed, naming the field."""
  overrides = [m.group(1) for arg in argv[1:]
               if (m := re.match(r'--?(?:no)?config\.([^=]+)', arg))]
  try:
    config = flags.FLAGS['config'].parser.parse(_config_argument(argv))
  except Exception:  # pylint: disable=broad-except  # the original error says more
    config = None
  if config is not None:
    for path in overrides:
      if message := _unknown_field(config, path):
        return message
  detail = (str(error).strip().splitlines() or [''])[0]
  given = ', '.join(f'--config.{o}' for o in overrides) or 'the --config overrides'
  return f'cannot apply {given} ({type(error).__name__}: {detail})'



def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line instead of a traceback for a misspelt --config field.

  ml_collections raises a bare AttributeError/KeyError (IndexError for a bad index) while
  absl parses --config.<field>=...; absl reports only its own flags.Error cleanly.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, IndexError) as e:
    print(f'advdef: error: {_override_error(argv, e)}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # orbax logs dozens of INFO lines per checkpoint; keep the console for progress and errors.
  logging.set_verbosity(logging.WARNING)
  # The one start-up deferral: flag and config-file errors (and --help) print before JAX
  # and the library load, which takes seconds.
  import jax
  from advdef import compilation, experiment, parallel
  # Before the first compilation, which reads these settings.
  compilation.prefer_eigen_convolutions()
  compilation.enable_cache(_COMPILATION_CACHE.value)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config.get('task') == 'rl':  # advdef.rl: one process, its own experiment
    from advdef.rl import experiment as rl_experiment
    _run_locked(config, workdir, rl_experiment.prepare, rl_experiment.run, holds_lock=True)
    return
  try:
    # Before anything touches a JAX backend.
    parallel.initialize_distributed(config, force=_DISTRIBUTED.value)
  except ValueError as e:
    print(f'advdef: error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('advdef on %s devices: %s', jax.device_count(), jax.devices())

  def prepare(config, workdir):
    prepared = experiment.prepare(config, workdir)
    parallel.validate_config(config)  # Device count, and the batch sizes it must divide.
    return prepared

  # The hosts of a multi-host run share one workdir: process 0 holds it for all.
  _run_locked(config, workdir, prepare, experiment.run, holds_lock=jax.process_index() == 0)


def _run_locked(config, workdir, prepare, run, *, holds_lock: bool):
  """prepare(config, workdir) then run(config, workdir, progress=, prepared=) under the
  workdir lock, with one-line errors: exit code 2 for bad configs, inputs and unreadable
  checkpoints, 1 for a non-finite loss."""
  from advdef import checkpointing, training, workdir_lock
  # Released on any exit, sys.exit included.
  with contextlib.ExitStack() as stack:
    try:
      # One run per workdir, before prepare opens its checkpoints (which cleans up the
      # temporary directories of a save in progress).
      if holds_lock:
        stack.enter_context(workdir_lock.hold(workdir))
      prepared = prepare(config, workdir)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
      # Bad configs and inputs fail before any compute: one readable line, no traceback.
      print(f'advdef: error: {e}', file=sys.stderr)
      sys.exit(2)
    try:
      run(config, workdir, progress=sys.stderr.isatty(), prepared=prepared)
    except training.NonFiniteLossError as e:
      print(f'advdef: error: {e}', file=sys.stderr)
      sys.exit(1)
    except checkpointing.CheckpointsUnreadableError as e:
      print(f'advdef: error: {e}', file=sys.stderr)
      sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
