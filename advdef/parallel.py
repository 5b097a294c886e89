"""Data parallelism: the one module that knows about devices, meshes and processes.

advdef runs data-parallel with `jax.jit` over a 1-D device mesh whose axis is named 'data'
(no pmap, no shard_map): batches are sharded over 'data', parameters, optimizer state and
the device-resident data set are replicated, and XLA inserts the all-reduces (the axis type
is Auto, so the compiler propagates shardings from the few annotations advdef makes).

  mesh = parallel.create_mesh()                     # all devices; or create_mesh(2)
  state = parallel.replicate(state, mesh)           # parameters: a copy on every device
  batch = parallel.shard_batch(batch, mesh)         # rows split over the devices
  x = parallel.constrain_batch(x, mesh)             # the same, inside jit

Results do not depend on the device count beyond floating-point reassociation: random
draws over sharded arrays are the same as unsharded ones (`jax_threefry_partitionable`, on
by default), and batches keep their size, which must be a multiple of the device count
(`check_divisible` says which field to change; padding would change which examples share
a batch, and with it the random draws of stochastic defenses).

Config (`config.parallel`, see advdef.config_utils.base_config):

  num_devices          0 = all devices (every process's), else that many (a multiple of
                       the process count; each process contributes the same number)
  distributed          call jax.distributed.initialize() before anything touches JAX; it
                       is also called when JAX_COORDINATOR_ADDRESS is set or
                       coordinator_address is given
  coordinator_address  'host:port' of process 0 ('' = auto-detect: Cloud TPU, Slurm,
                       Open MPI, or the JAX_COORDINATOR_ADDRESS environment variable)
  num_processes        0 = auto-detect
  process_id           -1 = auto-detect

Multi-host: every process runs the same program, loads the whole (small) data set and
feeds the same global batch; `jax.device_put` then places on each process only the rows
its devices hold. For inputs too large for that, each process loads only its rows
(`process_rows`) and `global_batch` assembles the global array
(`jax.make_array_from_process_local_data`). Values read back to the host go through
`to_numpy`, which gathers across processes when an array spans other processes' devices.
Only process 0 writes metrics and reports (advdef.metric_writers, advdef.experiment);
orbax writes checkpoints collectively, each replicated array once, so the workdir must be
on a file system every host sees. CPU processes exchange collectives over gloo (the default
of `jax_cpu_collectives_implementation` in jax 0.10; 'mpi' is the alternative):
tests/parallel_test.py runs two processes on localhost this way.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from advdef import config_utils

DATA_AXIS = 'data'

# Fields of config.parallel and the values used when the section (or a field) is absent,
# e.g. in the config.json of a run from before data parallelism: base_config's, the one home
# of defaults.
DEFAULTS = config_utils.base_config().parallel.to_dict()


def _section(config) -> dict[str, Any]:
  section = getattr(config, 'parallel', None) if config is not None else None
  values = dict(DEFAULTS)
  if section is not None:
    keys = list(section.keys()) if hasattr(section, 'keys') else []
    unknown = sorted(set(keys) - set(DEFAULTS))
    if unknown:
      raise ValueError(f'Unknown parallel config field(s) {unknown}; valid fields: '
                       f'{sorted(DEFAULTS)}.')
    values.update({k: section[k] for k in keys})
  return values


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_fields(p: dict[str, Any]) -> None:
  """Type and range checks that need no devices (safe before jax.distributed.initialize)."""
  if not _is_int(p['num_devices']) or p['num_devices'] < 0:
    raise ValueError(f'parallel.num_devices={p["num_devices"]!r} must be an integer >= 0 '
                     '(0 = all devices).')
  if not isinstance(p['distributed'], (bool, np.bool_)):
    raise ValueError(f'parallel.distributed={p["distributed"]!r} must be True or False.')
  address = p['coordinator_address']
  if not isinstance(address, str) or (address and ':' not in address):
    raise ValueError(f'parallel.coordinator_address={address!r} must be "" (auto-detect) or '
                     '"host:port" of process 0, e.g. "10.0.0.1:1234".')
  if not _is_int(p['num_processes']) or p['num_processes'] < 0:
    raise ValueError(f'parallel.num_processes={p["num_processes"]!r} must be an integer >= 0 '
                     '(0 = auto-detect).')
  if not _is_int(p['process_id']) or p['process_id'] < -1:
    raise ValueError(f'parallel.process_id={p["process_id"]!r} must be an integer >= 0, or -1 '
                     '(auto-detect).')
  if p['num_processes'] and p['process_id'] >= p['num_processes']:
    raise ValueError(f'parallel.process_id={p["process_id"]} must be below '
                     f'parallel.num_processes={p["num_processes"]}.')


def initialize_distributed(config=None, *, force: bool = False) -> bool:
  """Calls `jax.distributed.initialize()` when the config or the environment asks for it.

  It is asked for by `parallel.distributed=True`, a non-empty `parallel.coordinator_address`,
  the `JAX_COORDINATOR_ADDRESS` environment variable, or `force` (main's --distributed
  flag). Must run before anything initializes a JAX backend (jax.devices(), any array).
  Arguments left at their auto value are detected by JAX (Cloud TPU, Slurm, Open MPI).

  Returns:
    True if JAX runs distributed (now or already), False for a single-process run.
  """
  if jax.distributed.is_initialized():
    return True
  p = _section(config)
  _check_fields(p)
  if not (force or p['distributed'] or p['coordinator_address']
          or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return False
  kwargs: dict[str, Any] = {}
  if p['coordinator_address']:
    kwargs['coordinator_address'] = p['coordinator_address']
  if p['num_processes']:
    kwargs['num_processes'] = int(p['num_processes'])
  if p['process_id'] >= 0:
    kwargs['process_id'] = int(p['process_id'])
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def _mesh_devices(num_devices: int | None) -> list:
  available = jax.device_count()
  n = available if not num_devices else int(num_devices)
  if n > available:
    raise ValueError(f'parallel.num_devices={n} exceeds the {available} available '
                     f'{jax.default_backend()} devices; use 0 (all) or at most {available}.')
  if n == available:
    return list(jax.devices())
  processes = jax.process_count()
  if n % processes:
    raise ValueError(f'parallel.num_devices={n} must be a multiple of the {processes} '
                     'processes (each contributes the same number of devices), or 0 (all).')
  per_process = n // processes
  return [d for p in range(processes)
          for d in [d for d in jax.devices() if d.process_index == p][:per_process]]


def create_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `num_devices` devices (None or 0 = all) with the Auto axis 'data'.

  Raises:
    ValueError: naming parallel.num_devices when it is negative or exceeds the devices.
  """
  if num_devices is not None and (not _is_int(num_devices) or num_devices < 0):
    raise ValueError(f'parallel.num_devices={num_devices!r} must be an integer >= 0 '
                     '(0 = all devices).')
  devices = _mesh_devices(num_devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def mesh_from_config(config) -> jax.sharding.Mesh:
  """The data-parallel mesh of `config.parallel` (all devices when the section is absent)."""
  p = _section(config)
  _check_fields(p)
  return create_mesh(p['num_devices'])


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def num_shards(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def check_divisible(batch_size: int, mesh: jax.sharding.Mesh, field: str) -> None:
  """Raises a ValueError naming `field` unless batch_size is a multiple of the device count.

  Called before any compute, so a bad combination fails at once, not after training.
  """
  n = num_shards(mesh)
  if batch_size % n:
    up = -(-batch_size // n) * n
    raise ValueError(f'{field}={batch_size} is not divisible by the {n} devices of the '
                     f'data-parallel mesh; set {field} to a multiple of {n} (e.g. {up}), or '
                     'parallel.num_devices to a divisor of it.')


def validate_config(config) -> jax.sharding.Mesh:
  """Checks config.parallel against the devices and the batch sizes it must divide.

  Returns the mesh. Raises ValueError naming the field (parallel.num_devices,
  train.batch_size or eval.batch_size).
  """
  mesh = mesh_from_config(config)
  train = getattr(config, 'train', None)
  if train is not None and not getattr(train, 'checkpoint', ''):
    check_divisible(train.batch_size, mesh, 'train.batch_size')
  if getattr(config, 'eval', None) is not None:
    check_divisible(config.eval.batch_size, mesh, 'eval.batch_size')
  return mesh


def grid_mesh(num_points: int, devices=None) -> jax.sharding.Mesh | None:
  """A 1-D mesh named 'grid' for a hyperparameter grid of num_points (advdef's in-graph
  sweeps): over `devices` (default all) when there are several and they divide the grid."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) > 1 and num_points % len(devices) == 0:
    return jax.sharding.Mesh(np.asarray(devices), ('grid',))
  return None


def put(tree, sharding):
  """Places every leaf on a (possibly multi-process) sharding.

  Host values, identical on every process, go through make_array_from_callback, which needs
  no communication; device arrays (e.g. replicated over another mesh) are moved with
  device_put.
  """
  def put_leaf(a):
    if isinstance(a, jax.Array):
      return jax.device_put(a, sharding)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  return jax.tree_util.tree_map(put_leaf, tree)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places every leaf (numpy or jax arrays, PRNG keys) fully on every device of the mesh."""
  return put(tree, replicated(mesh))


def shard_batch(tree, mesh: jax.sharding.Mesh):
  """Places every leaf split along its leading axis over 'data' (0-d leaves replicated).

  The leading axis must be a multiple of the device count (see check_divisible).
  """
  n = num_shards(mesh)
  data, rep = data_sharding(mesh), replicated(mesh)

  def put(x):
    if not np.ndim(x):
      return jax.device_put(x, rep)
    if x.shape[0] % n:
      raise ValueError(f'a batch of {x.shape[0]} rows cannot be split over {n} devices; the '
                       'batch size must be a multiple of the device count.')
    return jax.device_put(x, data)
  return jax.tree_util.tree_map(put, tree)


def constrain_batch(tree, mesh: jax.sharding.Mesh):
  """Inside jit: marks every leaf as split over 'data' along its leading axis."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.with_sharding_constraint(x, data_sharding(mesh)), tree)


def process_rows(num_rows: int) -> slice:
  """The contiguous rows of a global batch (or split) that this process loads and feeds.

  Process p of P gets rows [p * num_rows / P, (p + 1) * num_rows / P); with the devices
  of process p holding consecutive positions along 'data' (the default mesh), this is
  exactly the part of a 'data'-sharded array that p's devices hold.
  """
  processes, index = jax.process_count(), jax.process_index()
  if num_rows % processes:
    raise ValueError(f'{num_rows} rows cannot be split evenly over {processes} processes.')
  per = num_rows // processes
  return slice(index * per, (index + 1) * per)


def global_batch(local_tree, mesh: jax.sharding.Mesh):
  """Assembles each process's rows (`process_rows`) into global 'data'-sharded arrays.

  Every process calls this with its own rows (same shapes on every process); the result
  has P times as many rows. On one process it is shard_batch.
  """
  sharding = data_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_tree)


def to_numpy(tree):
  """Host numpy copies of every leaf; arrays spanning other processes' devices are gathered
  from all processes first (every process must call this collectively then)."""
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


def describe(mesh: jax.sharding.Mesh) -> str:
  """One line for logs: devices, platform and processes of the mesh."""
  first = mesh.devices.flat[0]
  return (f'data-parallel mesh of {num_shards(mesh)} {first.platform} device(s) over '
          f'{jax.process_count()} process(es)')


__all__ = ['DATA_AXIS', 'check_divisible', 'constrain_batch', 'create_mesh', 'data_sharding',
           'describe', 'global_batch', 'grid_mesh', 'initialize_distributed',
           'mesh_from_config', 'process_rows', 'put', 'replicate', 'replicated', 'shard_batch',
           'to_numpy', 'validate_config']
