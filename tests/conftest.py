"""Test-wide setup.

Four host CPU devices are forced before JAX is imported so that the multi-device
tests can compare a 1-device mesh with a 4-device mesh in the same process.
"""
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Configs are plain modules in <repo>/configs, imported as `configs.<name>`.
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
BIRDS525 = REPO.parent / "shared" / "data" / "birds525"
CARS196 = REPO.parent / "shared" / "data" / "cars196"


def _require(root):
  """Returns a shared data set's root; fails under CI=true when missing, else skips."""
  if root.is_dir():
    return root
  if os.environ.get("CI") == "true":
    pytest.fail(f"{root.name} is required in CI but missing at {root}")
  pytest.skip(f"{root.name} not found at {root}")


@pytest.fixture
def birds525_root():
  return _require(BIRDS525)


def require_cars196():
  return _require(CARS196)


@pytest.fixture
def cars196_root():
  return require_cars196()
