"""Metric logging: TensorBoard event files plus a JSON-lines file, from process 0 only.

clu's metric writers import TensorFlow for their TensorBoard backend, which fgjax does
not otherwise need (hundreds of MB); tensorboardX writes the same event-file format
with only protobuf, so TensorBoard reads these logs unchanged.
"""

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to `<workdir>/tensorboard` and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard logs are a convenience; metrics.jsonl stays.
      self._tb = None
    # Appending keeps the history of a run that was killed and resumed.
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any],
                    jsonl: bool = True) -> None:
    """Logs `scalars` at `step` to TensorBoard and, unless jsonl=False, metrics.jsonl."""
    if not self._active:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
    if jsonl:
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean})
                        + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
