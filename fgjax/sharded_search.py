"""Exact k-NN search over impostors split along a device mesh: top-k per shard, merged.

At M = 10M impostors no device holds them all (fgjax.train_state.Layout splits the rows
over the mesh's data axis), so the k-NN impostor policies' neighbour lists (NNGK
review eq. 6-7) are searched where the rows live: every device scores the queries
against its own M / n rows with `fgjax.search`'s chunked brute force, keeps its k best
with their global row ids, and one all-gather of the (B, n k) candidates lets every
device merge them into the global top k. Communication is O(B n k) per query block,
never O(M d).

  index = sharded_search.index_over(state.impostors, backend="exact")
  sq_dists, rows = index.search(queries, k)   # global row ids, absent rows never

`index_over` is the one entry point for an impostor set as the training state holds
it (padded with absent rows, maybe split): it picks this sharded index for split rows
and the exact backend, and otherwise `fgjax.search.build_index` over the present rows.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgjax import impostors as impostors_lib
from fgjax import parallel
from fgjax import search


def _local_top_k(queries, centers, sq_norms, *, k: int, chunk_size: int):
  """This device's k best rows (k <= its row count), ids global; then the merge."""
  rows = centers.shape[0]
  chunk = min(chunk_size, rows)
  pad = -rows % chunk
  if pad:  # A chunk multiple for search's scan; +inf norms are never chosen.
    centers = jnp.pad(centers, ((0, pad), (0, 0)))
    sq_norms = jnp.pad(sq_norms, (0, pad), constant_values=jnp.inf)
  dist, idx = search._exact_topk(queries, centers, sq_norms, k=k,  # pylint: disable=protected-access
                                 chunk_size=chunk)
  idx = idx + jax.lax.axis_index(parallel.DATA_AXIS) * rows
  # One collective: every shard's candidates, in shard (= row id) order.
  all_d = jax.lax.all_gather(dist, parallel.DATA_AXIS, axis=1, tiled=True)
  all_i = jax.lax.all_gather(idx, parallel.DATA_AXIS, axis=1, tiled=True)
  return all_d, all_i


class ShardedExactIndex(search.NeighborIndex):
  """Exact squared-L2 top-k over centers split along the data axis of `mesh`.

  The same results as `search.ExactIndex` over the present rows (ties aside), with
  row ids into the full (padded) array.
  """

  backend = "exact"

  def __init__(self, centers: jax.Array, valid: Any, mesh, *,
               chunk_size: int = search.DEFAULT_CHUNK_SIZE):
    """
    Args:
      centers: (R, d) float array, R divisible by the mesh's device count (split
        along it, or placed so here).
      valid: (R,) bool, False for absent rows (never returned).
      mesh: the mesh whose data axis splits the rows.
      chunk_size: rows per scoring step on each device (memory B * chunk_size).
    """
    rows, dim = centers.shape
    n = mesh.devices.size
    if rows % n:
      raise ValueError(f"{rows} center rows do not split over {n} devices; pad them "
                       "(fgjax.impostors.pad_rows).")
    valid = np.asarray(valid, bool)
    super().__init__(int(valid.sum()), dim)
    split = NamedSharding(mesh, P(parallel.DATA_AXIS))
    centers = jax.device_put(jnp.asarray(centers, jnp.float32), split)
    sq_norms = jnp.where(jax.device_put(valid, split),
                         jnp.sum(centers * centers, axis=1), jnp.inf)
    self._mesh, self._rows_per_device = mesh, rows // n
    self._centers, self._sq_norms, self._chunk = centers, sq_norms, chunk_size

  @functools.partial(jax.jit, static_argnums=(0, 4))
  def _sharded(self, queries, centers, sq_norms, k):
    local = jax.shard_map(
        functools.partial(_local_top_k, k=min(k, self._rows_per_device),
                          chunk_size=self._chunk),
        mesh=self._mesh, in_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=(P(), P()), check_vma=False)
    all_d, all_i = local(queries, centers, sq_norms)
    neg, pos = jax.lax.top_k(-all_d, k)
    return -neg, jnp.take_along_axis(all_i, pos, axis=1)

  def _search(self, queries, k):
    return self._sharded(jnp.asarray(queries, jnp.float32), self._centers,
                         self._sq_norms, k)


def _split_mesh(centers: Any):
  """The mesh splitting `centers`' rows over more than one device, else None."""
  sharding = getattr(centers, "sharding", None)
  if (isinstance(sharding, NamedSharding) and sharding.mesh.devices.size > 1
      and tuple(sharding.spec)[:1] == (parallel.DATA_AXIS,)):
    return sharding.mesh
  return None


def index_over(impostors: impostors_lib.ImpostorSet, backend: str) -> search.NeighborIndex:
  """A k-NN index over an impostor set as the training state holds it.

  Row ids are those of `impostors`; absent rows (fgjax.impostors.ABSENT labels) are
  never returned. Split rows with the exact backend are searched where they live
  (`ShardedExactIndex`); otherwise the present rows, a prefix of the set, go to
  `fgjax.search.build_index` (ScaNN: on this host's CPU).
  """
  valid = parallel.to_host(impostors.labels) != impostors_lib.ABSENT
  mesh = _split_mesh(impostors.centers)
  if mesh is not None and backend == "exact":
    return ShardedExactIndex(impostors.centers, valid, mesh)
  # Absent rows trail the present ones; the exact index keeps them on their device.
  count = int(np.flatnonzero(valid)[-1]) + 1 if valid.any() else 0
  centers = impostors.centers if backend == "exact" else parallel.to_host(
      impostors.centers)
  return search.build_index(centers[:count], backend=backend)
