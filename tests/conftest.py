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


def require_birds525():
  """Returns the birds525 root; fails under CI=true when missing, else skips."""
  if BIRDS525.is_dir():
    return BIRDS525
  if os.environ.get("CI") == "true":
    pytest.fail(f"birds525 is required in CI but missing at {BIRDS525}")
  pytest.skip(f"birds525 not found at {BIRDS525}")


@pytest.fixture
def birds525_root():
  return require_birds525()


def require_cars196():
  """Returns the cars196 root; fails under CI=true when missing, else skips."""
  if CARS196.is_dir():
    return CARS196
  if os.environ.get("CI") == "true":
    pytest.fail(f"cars196 is required in CI but missing at {CARS196}")
  pytest.skip(f"cars196 not found at {CARS196}")


@pytest.fixture
def cars196_root():
  return require_cars196()
