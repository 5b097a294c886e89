"""Shared test setup: CPU only, 4 virtual CPU devices for the sharding tests, strict rank
promotion, and one persistent compilation cache for the whole session."""

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
# Tests are compile-bound: LLVM at -O0 (what this JAX setting asks of XLA) halves XLA:CPU's
# compile time (the quick start's smoke config: 100 s -> 50 s over 89 programs) for about 30%
# slower generated loops (ResNet-20 gradients; convolutions and matmuls are library kernels
# either way). Set in the environment so advdef.main subprocesses get it too. Not for real runs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# XLA:CPU's fusion emitters (MLIR, the default in jax 0.10) cost tens of milliseconds of
# compiling per fusion; its older elemental emitters compile faster and make slower loops.
# With both settings the quick start's smoke config spent 38.7 s instead of 60.2 s tracing and
# compiling its 83 programs, and experiment_test.py with retrofit_test.py took 299 s instead of
# 317 s (2026-11-29, 2 cores, one run each). Tests only, as above.
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

# Many tests compile the same small programs (one model's attack and scoring steps under
# several evaluators, `advdef.main` runs in subprocesses): one cache for the session, shared by
# the xdist workers (they inherit this environment from the controller, which imports this
# file first) and by the subprocesses, makes each program compile once. A fresh directory, so a
# stale cache from another JAX version never hides a compile.
if "ADVDEF_COMPILATION_CACHE" not in os.environ:
  os.environ["ADVDEF_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="advdef-test-jax-cache-")
  _OWNED_CACHE = os.environ["ADVDEF_COMPILATION_CACHE"]
else:
  _OWNED_CACHE = None

import pytest  # noqa: E402

from advdef import compilation  # noqa: E402

# What advdef.main does first; the subprocesses inherit XLA_FLAGS from here.
compilation.prefer_eigen_convolutions()
compilation.enable_cache()


def subprocess_env(**extra):
  """The environment for a test's `advdef.main` or script subprocess: CPU, one device (without
  the 4 virtual ones above), and the tests' other compile settings."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


def pytest_unconfigure(config):
  if _OWNED_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
    shutil.rmtree(_OWNED_CACHE, ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST10K = SHARED_DATA / "mnist10k.npz"
CIFAR_PARTIAL = SHARED_DATA / "cifar10_partial.npz"


@pytest.fixture
def mnist10k_path():
  if not MNIST10K.exists():
    pytest.skip(f"{MNIST10K} is absent (it ships beside the repo in ../shared/data)")
  return MNIST10K


@pytest.fixture
def cifar_partial_path():
  if not CIFAR_PARTIAL.exists():
    pytest.skip(f"{CIFAR_PARTIAL} is absent (it ships beside the repo in ../shared/data)")
  return CIFAR_PARTIAL


@pytest.fixture
def run_processes(tmp_path):
  """Runs a Python script as several cooperating processes of one jax.distributed job.

  run(script_text, argv_of(i, port) -> list[str], num_processes=2, devices_per_process=1,
      timeout=120) -> [(returncode, combined stdout/stderr)] per process. Every process
  gets the coordinator's port (a free local one); stragglers are killed on the way out.
  """
  import socket
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]

  def run(script_text, argv_of, num_processes=2, devices_per_process=1, timeout=120):
    script = tmp_path / 'worker.py'
    script.write_text(script_text)
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}',
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]))
    env.pop('JAX_COORDINATOR_ADDRESS', None)
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, argv_of(i, port))],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    logs = []
    try:
      for proc in procs:
        logs.append(proc.communicate(timeout=timeout)[0])
    finally:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    return [(proc.returncode, log) for proc, log in zip(procs, logs)]

  return run


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: an end-to-end run of a minute or more; scheduled first (see below)")


def pytest_collection_modifyitems(config, items):
  # The end-to-end runs take 1-3 minutes each: started last, one of them keeps a single
  # xdist worker busy after the other has finished; started first, the short tests fill in.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
