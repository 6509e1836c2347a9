"""Data parallelism with `jax.sharding.Mesh` + `NamedSharding` and `jax.jit`.

One mesh axis, 'data': batches are split along it, and so are the impostor rows of the
training state (fgjax.train_state.Layout); the rest of the state is replicated.
The same code runs on one CPU, one GPU, many local devices, or many hosts (after
`jax.distributed.initialize`), because arrays carry their sharding and `jax.jit`
partitions the update function from it.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(config) -> None:
  """`jax.distributed.initialize` for a multi-host run (config.distributed).

  With config.coordinator_address empty, JAX detects the cluster (SLURM, Open MPI,
  TPU pods, Kubernetes); otherwise every process passes the same address and process
  count and its own config.process_id. Call it before anything touches a device.
  CPU collectives go over gloo: without it, processes without accelerators cannot
  all-reduce across hosts (the setting does nothing to GPU or TPU collectives).
  """
  kwargs = {}
  if config.get("coordinator_address"):
    count, index = int(config.num_processes), int(config.process_id)
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"config.coordinator_address={config.coordinator_address!r} needs "
                       f"config.num_processes >= 1 and 0 <= config.process_id < it; got "
                       f"num_processes={count}, process_id={index}.")
    kwargs = dict(coordinator_address=config.coordinator_address, num_processes=count,
                  process_id=index)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (impostor row) axis split over the data axis (fgjax.train_state.Layout)."""
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


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (possibly sharded, possibly multi-host) arrays as NumPy."""
  return jax.tree.map(gather, tree)


def gather(x: Any) -> np.ndarray:
  """The full value of an array on every host, as NumPy: split arrays of several
  processes (a batch, impostor rows) are all-gathered across them."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
