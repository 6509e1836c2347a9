"""Data parallelism with `jax.sharding.Mesh` + `NamedSharding` and `jax.jit`.

One mesh axis, 'data': batches are split along it, the training state is replicated.
The same code runs on one CPU, one GPU, many local devices, or many hosts (after
`jax.distributed.initialize`), because arrays carry their sharding and `jax.jit`
partitions the update function from it.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  """Raises a ValueError naming `field` when the batch does not split evenly."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f"{field}={batch_size} is not divisible by the {n} devices of the mesh; "
        f"use a multiple of {n} (e.g. {max(n, batch_size - batch_size % n)}).")


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles this process's slice of a batch (a pytree of arrays with a leading
  batch axis) into globally sharded arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
      local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Fetches a (possibly sharded) pytree as NumPy arrays on this host."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def gather(x: jax.Array) -> np.ndarray:
  """The full value of a batch-sharded array on every host, as NumPy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
