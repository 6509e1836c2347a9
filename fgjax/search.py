"""Nearest-neighbour search over impostors for the RBF classifier.

The RBF rule of impostor networks (Lebedev et al., "Impostor Networks for Fast
Fine-Grained Recognition", eq. 3) weighs every impostor c_j by the Gaussian
kernel w_j = exp(-||y - c_j||^2 / (2 sigma^2)) (eq. 2). For a small bandwidth
almost all weights vanish, so the sums in eq. (3) may be restricted to the k
nearest impostors (Sec. 3.1; also eq. 9 of the NNGK review). This module finds
those neighbours.

One interface, two backends:

* ``"exact"``: brute force in JAX on any device. Squared distances use the
  expansion ||q||^2 + ||c||^2 - 2 q.c (one matmul), and the impostors are
  processed in chunks with a running top-k merge so that memory stays bounded
  (B x chunk_size floats) even for M = 1M.
* ``"scann"``: Google's ScaNN on the host CPU. Brute force for small M, and a
  k-means tree + asymmetric hashing (AH) + exact float32 reordering for large M.

Both return ``(sq_dists, indices)``: (B, k) float32 true squared L2 distances in
ascending order and (B, k) int32 row indices into the stored centers.

Example:
  index = build_index(centers, backend="scann")
  sq_dists, idx = index.search(queries, k=64)
  log_probs = impostors.rbf_log_probs_from_neighbors(
      sq_dists, idx, labels, sigma, num_classes)
"""

from __future__ import annotations

import abc
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.losses import _checks

BACKENDS = ("exact", "scann")

# Below this many impostors ScaNN brute force is both exact and fast enough;
# above it the tree + AH + reorder pipeline pays off.
DEFAULT_BRUTE_FORCE_THRESHOLD = 20_000
DEFAULT_CHUNK_SIZE = 32_768


def _check_k(k: Any, size: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"`k` must be an int; got {type(k).__name__}.")
  k = int(k)
  if k < 1:
    raise ValueError(f"`k` must be >= 1; got k={k}.")
  if k > size:
    raise ValueError(
        f"`k`={k} exceeds the number of indexed centers M={size}; use "
        f"k <= {size}.")
  return k


class NeighborIndex(abc.ABC):
  """k-nearest-neighbour index over M fixed centers of dimension d."""

  backend: str

  def __init__(self, size: int, dim: int):
    self._size = size
    self._dim = dim

  @property
  def size(self) -> int:
    """Number of indexed centers M."""
    return self._size

  @property
  def dim(self) -> int:
    """Dimension d of the centers."""
    return self._dim

  def _check_queries(self, queries: Any) -> Any:
    queries = _checks.check_float_array(queries, "queries", 2)
    if queries.shape[1] != self._dim:
      raise ValueError(
          f"`queries` has dimension {queries.shape[1]} but the index holds "
          f"centers of dimension {self._dim}; embed queries with the same "
          "network that produced the centers.")
    return queries

  def search(self, queries: Any, k: int) -> tuple[jax.Array, jax.Array]:
    """Finds the k nearest centers of each query under squared L2.

    Args:
      queries: (B, d) floating array (NumPy or JAX), cast to float32.
      k: number of neighbours, 1 <= k <= M.

    Returns:
      sq_dists: (B, k) float32, ||q_b - c_j||^2 in ascending order per row,
        clamped at >= 0.
      indices: (B, k) int32 row indices into the centers.
    """
    sq, idx = self.neighbors(queries, k)
    return jnp.asarray(sq), jnp.asarray(idx)

  def neighbors(self, queries: Any, k: int) -> tuple[Any, Any]:
    """`search`, returning the backend's own arrays (NumPy for ScaNN, jax for exact)."""
    queries = self._check_queries(queries)
    k = _check_k(k, self._size)
    if queries.shape[0] == 0:
      return (np.zeros((0, k), np.float32), np.zeros((0, k), np.int32))
    return self._search(queries, k)

  @abc.abstractmethod
  def _search(self, queries: Any, k: int) -> tuple[Any, Any]:
    ...

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(backend={self.backend!r}, "
            f"size={self._size}, dim={self._dim})")


# ----------------------------------------------------------------------------
# Exact backend (JAX).
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _exact_topk(queries: jax.Array, centers: jax.Array, center_sq_norms: jax.Array,
                k: int, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Chunked brute-force top-k; centers are pre-padded to a chunk multiple.

  Padded rows carry a squared norm of +inf so they never enter the top k
  (k <= M guarantees enough finite candidates).
  """
  num_chunks = centers.shape[0] // chunk_size
  q_sq = jnp.sum(queries * queries, axis=1, keepdims=True)

  def chunk_dists(c, c_sq):
    # HIGHEST keeps the matmul in float32 on TPU/GPU (default may be bf16/tf32),
    # which the expansion's cancellation cannot afford.
    dots = jnp.matmul(queries, c.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(q_sq + c_sq[None, :] - 2.0 * dots, 0.0)

  if num_chunks == 1:
    neg, idx = jax.lax.top_k(-chunk_dists(centers, center_sq_norms), k)
    return -neg, idx.astype(jnp.int32)

  b = queries.shape[0]
  init = (jnp.full((b, k), jnp.inf, jnp.float32), jnp.zeros((b, k), jnp.int32))
  xs = (centers.reshape(num_chunks, chunk_size, -1),
        center_sq_norms.reshape(num_chunks, chunk_size),
        jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size)

  def merge(carry, x):
    best_d, best_i = carry
    c, c_sq, offset = x
    d = chunk_dists(c, c_sq)
    ids = offset + jnp.arange(chunk_size, dtype=jnp.int32)
    all_d = jnp.concatenate([best_d, d], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, d.shape)], axis=1)
    neg, pos = jax.lax.top_k(-all_d, k)
    return (-neg, jnp.take_along_axis(all_i, pos, axis=1)), None

  (best_d, best_i), _ = jax.lax.scan(merge, init, xs)
  return best_d, best_i


class ExactIndex(NeighborIndex):
  """Brute-force index: JAX matmul + `jax.lax.top_k`, any device."""

  backend = "exact"

  def __init__(self, centers: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               device: jax.Device | None = None):
    """Stores the centers on `device`.

    Args:
      centers: (M, d) floating array, cast to float32.
      chunk_size: number of centers scored per step. Peak temporary memory is
        about B * (chunk_size + k) * 8 bytes per search. If M <= chunk_size
        the search is a single matmul + top_k.
      device: where to keep the centers; default: JAX's default device.
    """
    centers = _checks.check_float_array(centers, "centers", 2)
    m, d = centers.shape
    if m == 0:
      raise ValueError("`centers` is empty (M=0); an index needs >= 1 center.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or (
        chunk_size < 1):
      raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size!r}.")
    super().__init__(m, d)
    self.chunk_size = min(chunk_size, m)
    num_chunks = -(-m // self.chunk_size)
    pad = num_chunks * self.chunk_size - m
    centers = jnp.asarray(centers, jnp.float32)
    sq_norms = jnp.sum(centers * centers, axis=1)
    if pad:
      centers = jnp.pad(centers, ((0, pad), (0, 0)))
      sq_norms = jnp.pad(sq_norms, (0, pad), constant_values=jnp.inf)
    if device is not None:
      centers, sq_norms = jax.device_put((centers, sq_norms), device)
    self._centers = centers
    self._sq_norms = sq_norms

  def _search(self, queries, k):
    queries = jnp.asarray(queries, jnp.float32)
    return _exact_topk(queries, self._centers, self._sq_norms, k=k,
                       chunk_size=self.chunk_size)


# ----------------------------------------------------------------------------
# ScaNN backend (host CPU).
# ----------------------------------------------------------------------------


def _import_scann():
  try:
    # The pybind wrapper works without TensorFlow (scann.scann_ops_pybind
    # would import TF).
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "backend='scann' needs the `scann` package (Linux x86-64/aarch64, "
        "CPU only): `pip install scann`. Or use backend='exact'.") from e
  return scann_ops_pybind


def _exact_sq_dists_np(queries: np.ndarray, centers: np.ndarray,
                       indices: np.ndarray, batch: int = 256) -> np.ndarray:
  """||q_b - c_{indices[b, j]}||^2 by direct differences (no cancellation)."""
  out = np.empty(indices.shape, np.float32)
  for s in range(0, queries.shape[0], batch):
    diff = centers[indices[s:s + batch]] - queries[s:s + batch, None, :]
    out[s:s + batch] = np.einsum("bkd,bkd->bk", diff, diff)
  return out


class ScannIndex(NeighborIndex):
  """ScaNN index with the "squared_l2" distance (host CPU only).

  For M < brute_force_threshold: float32 brute force (exact). Otherwise a
  k-means tree with `num_leaves` leaves of which `leaves_to_search` are
  scanned per query, asymmetric hashing (2 dims per 16-centroid block, the
  ScaNN default) for scoring within leaves, and exact float32 re-scoring of
  the best `reorder_num_neighbors` candidates.

  Distances are always recomputed exactly for the returned ids (cheap: B*k*d)
  so both backends report the same quantity. If the tree search yields fewer
  than k candidates for a query (ScaNN pads such rows with NaN), that query
  falls back to exact brute force on the host.

  Threads: with num_threads == 1 (default) queries run through
  `search_batched`, single-threaded and with predictable latency on shared
  machines. With num_threads > 1 (or 0 = all cores) ScaNN's own thread pool is
  sized by `set_num_threads` and `search_batched_parallel` splits the batch
  into sub-batches of 256 queries across threads.
  """

  backend = "scann"

  def __init__(self, centers: Any, *,
               brute_force_threshold: int = DEFAULT_BRUTE_FORCE_THRESHOLD,
               num_leaves: int | None = None,
               leaves_to_search: int | None = None,
               reorder_num_neighbors: int = 256,
               dims_per_block: int = 2,
               training_sample_size: int = 250_000,
               num_threads: int = 1):
    """Builds the ScaNN searcher.

    Args:
      centers: (M, d) floating array, copied to host float32.
      brute_force_threshold: use brute force when M is below this.
      num_leaves: tree leaves; default round(sqrt(M)).
      leaves_to_search: leaves scanned per query; default
        max(8, ceil(num_leaves / 20)), i.e. ~5% of the data.
      reorder_num_neighbors: AH candidates re-scored exactly (raised to k at
        search time if smaller).
      dims_per_block: AH block size (2 = ScaNN's recommended accuracy).
      training_sample_size: points sampled to train the tree and AH codebooks.
      num_threads: search threads (1 = `search_batched`; 0 = all cores).
    """
    scann_ops_pybind = _import_scann()
    centers = _checks.check_float_array(centers, "centers", 2)
    centers = np.ascontiguousarray(np.asarray(centers, np.float32))
    m, d = centers.shape
    if m == 0:
      raise ValueError("`centers` is empty (M=0); an index needs >= 1 center.")
    if not np.all(np.isfinite(centers)):
      raise ValueError("`centers` contains NaN or inf; ScaNN cannot index it.")
    for name, value, lo in (("num_threads", num_threads, 0),
                            ("reorder_num_neighbors", reorder_num_neighbors, 1),
                            ("dims_per_block", dims_per_block, 1),
                            ("brute_force_threshold", brute_force_threshold, 0)):
      if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}; got {value!r}.")
    super().__init__(m, d)
    self._host_centers = centers
    self.num_threads = num_threads or (os.cpu_count() or 1)
    self.reorder_num_neighbors = reorder_num_neighbors
    self.brute_force = m < brute_force_threshold
    # num_neighbors here is only a default; every search passes k explicitly.
    builder = scann_ops_pybind.builder(centers, min(10, m), "squared_l2")
    if self.brute_force:
      self.num_leaves = self.leaves_to_search = None
      builder = builder.score_brute_force()
    else:
      num_leaves = num_leaves or max(1, round(math.sqrt(m)))
      if leaves_to_search is None:
        leaves_to_search = max(8, math.ceil(num_leaves / 20))
      if not 1 <= num_leaves <= m:
        raise ValueError(f"`num_leaves` must be in [1, M={m}]; got {num_leaves}.")
      if not 1 <= leaves_to_search <= num_leaves:
        raise ValueError(
            f"`leaves_to_search` must be in [1, num_leaves={num_leaves}]; got "
            f"{leaves_to_search}.")
      self.num_leaves = num_leaves
      self.leaves_to_search = leaves_to_search
      builder = (builder.tree(num_leaves=num_leaves,
                              num_leaves_to_search=leaves_to_search,
                              training_sample_size=min(m, training_sample_size))
                 # No anisotropic threshold: AVQ only helps dot-product search.
                 .score_ah(dims_per_block,
                           anisotropic_quantization_threshold=float("nan"),
                           training_sample_size=min(m, training_sample_size))
                 .reorder(reorder_num_neighbors))
    builder.set_n_training_threads(self.num_threads)
    self._searcher = builder.build()
    self._searcher.set_num_threads(self.num_threads)

  def _search(self, queries, k):
    queries = np.ascontiguousarray(np.asarray(queries, np.float32))
    kwargs = dict(final_num_neighbors=k)
    if not self.brute_force:
      kwargs.update(pre_reorder_num_neighbors=max(k, self.reorder_num_neighbors),
                    leaves_to_search=self.leaves_to_search)
    if self.num_threads > 1:
      idx, dist = self._searcher.search_batched_parallel(queries, **kwargs)
    else:
      idx, dist = self._searcher.search_batched(queries, **kwargs)
    idx = np.asarray(idx).astype(np.int32)
    short = np.flatnonzero(np.isnan(np.asarray(dist)).any(axis=1))
    if short.size:
      # Too few candidates in the searched leaves: fall back to brute force,
      # 64 queries at a time to bound the (64, M) temporary.
      c_sq = (self._host_centers ** 2).sum(1)
      for s in range(0, short.size, 64):
        rows = short[s:s + 64]
        d = c_sq[None, :] - 2.0 * queries[rows] @ self._host_centers.T
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        idx[rows] = part  # exact order is restored by the sort below
    sq = _exact_sq_dists_np(queries, self._host_centers, idx)
    order = np.argsort(sq, axis=1, kind="stable")
    sq = np.take_along_axis(sq, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    # NumPy out: a jitted consumer takes it directly, cheaper than jnp.asarray first
    # (about 35 us of the 0.25 ms of a batch-1 query at M = 100k).
    return sq, idx


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def build_index(centers: Any, backend: str = "exact", **options) -> NeighborIndex:
  """Builds a k-NN index over impostor centers.

  Args:
    centers: (M, d) floating array (NumPy or JAX), stored as float32.
    backend: "exact" (JAX brute force, any device) or "scann" (host CPU).
    **options: backend options; see `ExactIndex.__init__` (chunk_size,
      device) and `ScannIndex.__init__` (brute_force_threshold, num_leaves,
      leaves_to_search, reorder_num_neighbors, dims_per_block,
      training_sample_size, num_threads).

  Returns:
    A `NeighborIndex` with `.search(queries, k)`, `.size`, `.dim`, `.backend`.
  """
  if backend == "exact":
    return ExactIndex(centers, **options)
  if backend == "scann":
    return ScannIndex(centers, **options)
  raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")


class NeighborClassifier:
  """Eq. (3) over the k nearest impostors of an index: checked once, then cheap.

  For serving: the labels, sigma and k are validated when it is built, so a call is
  the search plus one compiled kernel (no per-call checks over the M labels, no
  op-by-op dispatch). On CPU that keeps the classifier at a few percent of the
  ConvNet's forward time (BENCHMARKS.md, "Timing breakdown").

    clf = NeighborClassifier(build_index(centers, 'scann'), labels, sigma=0.3,
                             num_classes=200, k=64)
    log_probs = clf(embeddings)  # (B, C)
  """

  def __init__(self, index: NeighborIndex, impostor_labels: Any, sigma: float,
               num_classes: int, k: int = 64):
    from fgjax import impostors  # pylint: disable=g-import-not-at-top
    labels = np.asarray(impostor_labels)
    if labels.shape != (index.size,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"`impostor_labels` must be ({index.size},) int, one per indexed "
                       f"center; got {labels.dtype} {labels.shape}.")
    self.k = _check_k(min(int(k), index.size), index.size)
    self.index = index
    self.num_classes = int(num_classes)
    # The full check (ranges, sigma > 0) once, on a 1-row dummy neighbourhood.
    impostors.rbf_log_probs_from_neighbors(
        jnp.zeros((1, self.k)), jnp.zeros((1, self.k), jnp.int32), labels, sigma,
        self.num_classes)
    self._labels = jnp.asarray(labels, jnp.int32)
    self._sigma = jnp.asarray(sigma, jnp.float32)
    self._rule = impostors._neighbor_rule  # pylint: disable=protected-access

  def __call__(self, queries: Any) -> jax.Array:
    """(B, C) float32 log-probabilities (-inf for classes with no neighbour)."""
    sq_dists, idx = self.index.neighbors(queries, self.k)
    return self._rule(sq_dists, idx, self._labels, self._sigma,
                      num_classes=self.num_classes)


def classify(queries: Any, impostor_centers: Any, impostor_labels: Any,
             sigma: float, num_classes: int, index: NeighborIndex | None = None,
             k: int = 64) -> jax.Array:
  """RBF class log-probabilities over the k nearest impostors.

  Eq. (3) of Lebedev et al. (Impostor Networks) with the sums restricted to
  the k nearest impostors (Sec. 3.1; eq. 9 of the NNGK review):
    p(l | y) = sum_{j in N_k(y)} w_j [l_j = l] / sum_{j in N_k(y)} w_j,
    w_j = exp(-||y - c_j||^2 / (2 sigma^2)).

  One-off calls; to classify many batches against the same impostors build a
  `NeighborClassifier` once instead.

  Args:
    queries: (B, d) float embeddings y.
    impostor_centers: (M, d) float impostors c_j; used to build an exact index
      when `index` is None, else checked against it.
    impostor_labels: (M,) int labels l_j in [0, num_classes).
    sigma: kernel bandwidth (> 0).
    num_classes: C.
    index: a prebuilt `NeighborIndex` over `impostor_centers`.
    k: neighbours per query (clipped to M).

  Returns:
    (B, C) float32 log-probabilities (-inf for classes with no neighbour).
  """
  impostor_centers = _checks.check_float_array(impostor_centers, "impostor_centers", 2)
  if index is None:
    index = build_index(impostor_centers, "exact")
  elif (index.size, index.dim) != tuple(impostor_centers.shape):
    raise ValueError(
        f"`index` holds (M, d)=({index.size}, {index.dim}) but "
        f"`impostor_centers` has shape {tuple(impostor_centers.shape)}; build "
        "the index from the same impostors.")
  return NeighborClassifier(index, impostor_labels, sigma, num_classes, k)(queries)
