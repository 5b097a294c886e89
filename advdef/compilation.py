"""JAX's persistent compilation cache, and how much of a run went to compiling.

Most of a short CPU run is XLA compiling attack loops, not running them (the quick start's
first run; see the README's Performance section). `python -m advdef.main` therefore turns on
JAX's persistent compilation cache by default, under the user's cache directory:

  $ADVDEF_COMPILATION_CACHE, else $XDG_CACHE_HOME/advdef/jax, else ~/.cache/advdef/jax

`--compilation_cache=off` (or ADVDEF_COMPILATION_CACHE=off) turns it off. A rerun, another
seed or another learning rate then reuses every compiled train, attack and scoring step:
the evaluators pass the weights as arguments (advdef.evaluators.base.jit_with_variables), so
the programs do not depend on them. The cache never changes results: an entry is keyed by
the whole program, the JAX/XLA version and the backend.

In a notebook: `compilation.enable_cache()` once, before the first compilation.

  with compilation.CompileTimer() as timer:
    ...
  timer.summary()  # {'compile_seconds': ..., 'compilations': ..., 'cache_hits': ...}
"""

from __future__ import annotations

import os
import threading
import warnings

import jax
from jax import monitoring

OFF = ('off', 'none', '0', 'false', '')

# Compilations quicker than this are not worth a disk write (and a read on the next run).
_MIN_COMPILE_SECONDS = 0.05

# jax.monitoring event names (jax/_src/dispatch.py and compilation_cache.py, jax 0.4-0.10).
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_TRACE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                 '/jax/core/compile/jaxpr_to_mlir_module_duration')
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
_CACHE_RETRIEVAL_EVENT = '/jax/compilation_cache/cache_retrieval_time_sec'


def default_cache_dir() -> str | None:
  """The cache directory advdef uses unless told otherwise; None when turned off."""
  env = os.environ.get('ADVDEF_COMPILATION_CACHE')
  if env is not None:
    return None if env.strip().lower() in OFF else os.path.expanduser(env)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'advdef', 'jax')


def enable_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` (default_cache_dir()).

  'off' (any of OFF) or None from the environment leaves it off. Returns the directory used,
  or None. Call before the first compilation: JAX reads the setting when it first compiles.
  """
  if directory is None:
    directory = default_cache_dir()
  elif directory.strip().lower() in OFF:
    directory = None
  if directory is None:
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', _MIN_COMPILE_SECONDS)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


# XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default. At advdef's shapes its Eigen
# convolutions are much faster: measured on 2 cores (AMD EPYC, 2026-11-29, same run), ResNet-20
# PGD-20 at batch 32 went from 13.9 to 22.6 img/s and its SGD train step from 114 to 202 img/s
# (lenet_like: 177 -> 196 and 3,676 -> 6,122 img/s); YNNPACK's kernel gradient was 2-4x
# PyTorch's, Eigen's is on par. Dots stay on YNNPACK.
YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
YNN_FUSION_TYPES = 'individual_dot'


def prefer_eigen_convolutions() -> bool:
  """Asks XLA:CPU for its Eigen convolutions (YNNPACK for dots only) in this process.

  XLA reads XLA_FLAGS once, when JAX creates its first backend, so call this before any JAX
  computation (`python -m advdef.main`, the benchmark and the tests do). A setting of the flag
  already in XLA_FLAGS wins, and ADVDEF_XLA_CPU_CONVOLUTIONS=ynnpack opts out. Returns whether
  the flag now applies; warns if a backend already exists, since it then cannot. No effect on
  GPU or TPU, and none on results beyond floating-point summation order.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  choice = os.environ.get('ADVDEF_XLA_CPU_CONVOLUTIONS', 'eigen').strip().lower()
  if choice not in ('eigen', 'ynnpack'):
    raise ValueError(f"ADVDEF_XLA_CPU_CONVOLUTIONS={choice!r}: expected 'eigen' or 'ynnpack'")
  if choice == 'ynnpack' or YNN_FUSION_FLAG in flags:
    return False
  from jax._src import xla_bridge  # no public way to ask whether a backend exists
  if xla_bridge.backends_are_initialized():
    warnings.warn('advdef: prefer_eigen_convolutions() called after JAX created its backend; '
                  'XLA:CPU keeps YNNPACK convolutions in this process (call it first).')
    return False
  os.environ['XLA_FLAGS'] = f'{flags} --{YNN_FUSION_FLAG}={YNN_FUSION_TYPES}'.strip()
  return True


class CompileTimer:
  """Sums the time JAX spends tracing and compiling while active (all threads).

  jax.monitoring listeners cannot be unregistered one by one, so one module-level listener
  feeds every active timer.
  """

  def __init__(self):
    self.compile_seconds = 0.0   # XLA compiling, or fetching from the persistent cache
    self.trace_seconds = 0.0     # tracing to a jaxpr and lowering to StableHLO
    self.compilations = 0        # programs compiled or fetched
    self.cache_hits = 0          # of which fetched from the persistent cache
    self.cache_read_seconds = 0.0

  def __enter__(self):
    _register()
    with _LOCK:
      _ACTIVE.append(self)
    return self

  def __exit__(self, *exc):
    with _LOCK:
      _ACTIVE.remove(self)
    return False

  def summary(self) -> dict:
    return {'compile_seconds': self.compile_seconds, 'trace_seconds': self.trace_seconds,
            'compilations': self.compilations, 'cache_hits': self.cache_hits,
            'cache_read_seconds': self.cache_read_seconds}


_LOCK = threading.Lock()
_ACTIVE: list[CompileTimer] = []
_REGISTERED = []


def _on_duration(event: str, duration: float, **_):
  with _LOCK:
    for timer in _ACTIVE:
      if event == _COMPILE_EVENT:
        timer.compile_seconds += duration
        timer.compilations += 1
      elif event in _TRACE_EVENTS:
        timer.trace_seconds += duration
      elif event == _CACHE_RETRIEVAL_EVENT:
        timer.cache_read_seconds += duration


def _on_event(event: str, **_):
  if event == _CACHE_HIT_EVENT:
    with _LOCK:
      for timer in _ACTIVE:
        timer.cache_hits += 1


def _register():
  with _LOCK:
    if _REGISTERED:
      return
    _REGISTERED.append(True)
  monitoring.register_event_duration_secs_listener(_on_duration)
  monitoring.register_event_listener(_on_event)
