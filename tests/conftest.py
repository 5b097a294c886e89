"""Shared test setup: CPU only, 4 virtual CPU devices for the sharding tests, strict rank promotion."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import pytest  # noqa: E402

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
