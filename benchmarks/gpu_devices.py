"""What benchmarks/gpu.py ran on: versions, devices and commit; PyTorch with CUDA where
it is there to compare against; a device's peak memory where the backend reports it."""

import datetime
import os
import platform
import subprocess
from typing import Any, Optional

import numpy as np

from benchmarks.gpu_record import Skipped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(module: str) -> Optional[str]:
  try:
    return __import__(module).__version__
  except Exception:  # pylint: disable=broad-except
    return None


def _git_commit() -> Optional[str]:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=REPO, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                           text=True, cwd=REPO, timeout=10).stdout.strip()
    commit = out.stdout.strip()
    return (commit + ("+dirty" if dirty else "")) if commit else None
  except (OSError, subprocess.SubprocessError):
    return None


def environment(smoke: bool) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
          "optax": _version("optax"), "numpy": np.__version__,
          "torch": _version("torch"), "backend": jax.default_backend(),
          "devices": [str(d) for d in devices],
          "device_kind": devices[0].device_kind, "platform": platform.platform(),
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "commit": _git_commit(), "smoke": bool(smoke)}


def torch_cuda(enabled: bool):
  """The torch module when it can run on a GPU here; else raises Skipped(why)."""
  if not enabled:
    raise Skipped("PyTorch comparison skipped: --notorch")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skipped(f"PyTorch comparison skipped: torch is not installed ({e})") from e
  if not torch.cuda.is_available():
    raise Skipped(f"PyTorch comparison skipped: torch {torch.__version__} sees no CUDA "
                  "device (torch.cuda.is_available() is False)")
  return torch


def peak_device_bytes() -> Optional[int]:
  """Peak bytes in use on the first device since the process started, where the
  backend reports it (GPU / TPU; the CPU client reports nothing)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get("peak_bytes_in_use")
