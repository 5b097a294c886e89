"""Entry point: python -m advdef.main --config=configs/quickstart.py --workdir=/tmp/qs

Trains (resuming from the workdir's latest checkpoint, or loading `train.checkpoint`),
evaluates every configured defense and attack, and writes report.json, report.md and plots
to the workdir. Any config field can be overridden: --config.train.num_epochs=3.

Data parallel over all devices by default (`--config.parallel.num_devices=N` for fewer);
multi-host runs start the same command on every host with
`--config.parallel.distributed=True` (see advdef.parallel and the README's "Scaling out").
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'quickstart.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                          'Experiment config file (path[:argument]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the '
                               'report.', required=True)
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                                 '(multi-host runs); the same as '
                                 '--config.parallel.distributed=True.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # orbax logs dozens of INFO lines per checkpoint; keep the console for progress and errors.
  logging.set_verbosity(logging.WARNING)
  # The one start-up deferral: flag and config-file errors (and --help) print before JAX
  # and the library load, which takes seconds.
  import jax
  from advdef import experiment, parallel, training
  config = _CONFIG.value
  try:
    # Before anything touches a JAX backend.
    parallel.initialize_distributed(config, force=_DISTRIBUTED.value)
  except ValueError as e:
    print(f'advdef: error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('advdef on %s devices: %s', jax.device_count(), jax.devices())
  try:
    prepared = experiment.prepare(config, _WORKDIR.value)
    parallel.validate_config(config)  # Device count, and the batch sizes it must divide.
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    # Bad configs and inputs fail before any compute: one readable line, no traceback.
    print(f'advdef: error: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    experiment.run(config, _WORKDIR.value, progress=sys.stderr.isatty(), prepared=prepared)
  except training.NonFiniteLossError as e:
    print(f'advdef: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
