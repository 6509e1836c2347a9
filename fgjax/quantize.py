"""Product quantisation (PQ) and optimised PQ (OPQ) of impostors, in JAX.

Impostor networks (Lebedev et al., "Impostor Networks for Fast Fine-Grained
Recognition", Sec. 3.2 "Impostor compression" and Sec. 4 "Impostors
compression", Fig. 2 right) store M impostors c_1..c_M of dimension d. With
product quantisation (Jegou et al. 2011) each impostor becomes m bytes: the
rotated vector c R is split into m sub-vectors of d/m dimensions, and each
sub-vector is replaced by the index of its nearest centroid in a per-subspace
codebook of 256 centroids. OPQ (Ge et al. 2013, non-parametric version) also
learns the orthogonal rotation R by alternating PQ training with an orthogonal
Procrustes update.

Conventions: vectors are rows; the rotated vector is ``x @ rotation``; a code
decodes to ``concat_j(codebooks[j, code_j]) @ rotation.T``. Because R is
orthogonal, ||q - decode(code)||^2 = sum_j ||(q R)_j - codebooks[j, code_j]||^2,
which is what asymmetric distance computation (ADC) evaluates from per-query
lookup tables of shape (m, 256) without decoding any impostor. Those squared
distances plug straight into the RBF rule (eqs. 2-3 of the paper).

Example:
  pq = train_opq(centers, num_subspaces=16)        # 16 bytes per impostor
  codes = encode(pq, centers)                       # (M, 16) uint8
  sq = adc_squared_distances(pq, queries, codes)    # (B, M) float32
  log_probs = rbf_log_probs_from_sq_distances(sq, labels, sigma, num_classes)

The paper trains the 'fixed' scheme against the compressed impostors, which are
``decode(pq, encode(pq, centers))`` (see `reconstruct`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.losses import _checks

MAX_CENTROIDS = 256  # codes are uint8
INIT_METHODS = ("kmeans++", "random")
OPQ_INIT_ROTATIONS = ("identity", "random")

# Bound on the (subspaces x points x centroids) float32 distance block that one
# step of the batched assignment materialises; larger problems are processed
# a few subspaces at a time with lax.map(batch_size=...).
_ASSIGN_BUDGET_BYTES = 256 * 2**20


class ProductQuantizer(NamedTuple):
  """A trained (O)PQ. A pytree: it can live in a params tree / checkpoint.

  Attributes:
    codebooks: (m, K, d/m) float32 centroids of each subspace (K <= 256).
    rotation: (d, d) float32 orthogonal matrix; identity for plain PQ. Vectors
      are rotated as ``x @ rotation`` before being split into subspaces.
  """
  codebooks: jax.Array
  rotation: jax.Array

  @property
  def num_subspaces(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def num_centroids(self) -> int:
    return int(self.codebooks.shape[1])

  @property
  def dim(self) -> int:
    return int(self.rotation.shape[0])


# ----------------------------------------------------------------------------
# Argument checks (Python level, outside jit).


def _check_matrix(x: Any, name: str) -> jax.Array:
  return jnp.asarray(_checks.check_float_array(x, name, 2), jnp.float32)


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be an int; got {type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")
  return int(value)


def _check_pq(pq: Any) -> None:
  if not isinstance(pq, ProductQuantizer):
    raise TypeError(
        "`pq` must be a ProductQuantizer (from train_pq / train_opq); got "
        f"{type(pq).__name__}.")
  cb, rot = pq.codebooks, pq.rotation
  if cb.ndim != 3 or rot.ndim != 2 or rot.shape[0] != rot.shape[1]:
    raise ValueError(
        "`pq` is malformed: codebooks must be (m, K, d/m) and rotation (d, d); "
        f"got {tuple(cb.shape)} and {tuple(rot.shape)}.")
  if cb.shape[0] * cb.shape[2] != rot.shape[0]:
    raise ValueError(
        f"`pq` is malformed: m * d/m = {cb.shape[0] * cb.shape[2]} does not "
        f"match the rotation size d = {rot.shape[0]}.")


def _check_dim(x: jax.Array, pq: ProductQuantizer, name: str) -> None:
  if x.shape[1] != pq.dim:
    raise ValueError(
        f"`{name}` has dimension {x.shape[1]} but the quantizer was trained on "
        f"d = {pq.dim}.")


def _check_codes(codes: Any, pq: ProductQuantizer) -> jax.Array:
  if not hasattr(codes, "shape") or not hasattr(codes, "dtype"):
    codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != pq.num_subspaces:
    raise ValueError(
        f"`codes` must be (num_points, m={pq.num_subspaces}); got shape "
        f"{tuple(codes.shape)}.")
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(
        f"`codes` must be an integer array (uint8 from `encode`); got "
        f"{codes.dtype}.")
  return jnp.asarray(codes)


def _check_training_args(x: Any, num_subspaces: Any, num_centroids: Any,
                         iterations: Any, seed: Any, init: str
                         ) -> tuple[jax.Array, int, int, int, int]:
  x = _check_matrix(x, "x")
  m = _check_int(num_subspaces, "num_subspaces", 1)
  k = _check_int(num_centroids, "num_centroids", 1)
  iterations = _check_int(iterations, "iterations", 0)
  seed = _check_int(seed, "seed", 0)
  n, d = x.shape
  if d % m:
    divisors = [v for v in range(1, d + 1) if d % v == 0]
    raise ValueError(
        f"The dimension d={d} of `x` must be divisible by num_subspaces={m}; "
        f"valid choices are {divisors} (or pad/project x to a multiple of {m}).")
  if k > MAX_CENTROIDS:
    raise ValueError(
        f"`num_centroids` must be <= {MAX_CENTROIDS} (codes are uint8); got {k}.")
  if n < k:
    raise ValueError(
        f"Need at least num_centroids={k} training points to train a codebook; "
        f"`x` has {n}. Use more points or a smaller num_centroids.")
  if init not in INIT_METHODS:
    raise ValueError(f"`init` must be one of {INIT_METHODS}; got {init!r}.")
  return x, m, k, iterations, seed


# ----------------------------------------------------------------------------
# k-means, vmapped over subspaces.


def _split(x: jax.Array, m: int) -> jax.Array:
  """(N, d) -> (m, N, d/m) sub-vectors."""
  n, d = x.shape
  return x.reshape(n, m, d // m).transpose(1, 0, 2)


def _assign_one(x: jax.Array, centers: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of each point in one subspace.

  Args:
    x: (N, s) points.
    centers: (K, s) centroids.

  Returns:
    (N,) int32 indices and (N,) float32 squared distances.
  """
  # ||x||^2 - 2 x.c + ||c||^2: one matmul instead of an (N, K, s) difference.
  d2 = (jnp.sum(x * x, axis=1, keepdims=True)
        - 2.0 * x @ centers.T
        + jnp.sum(centers * centers, axis=1)[None, :])
  idx = jnp.argmin(d2, axis=1).astype(jnp.int32)
  best = jnp.maximum(jnp.take_along_axis(d2, idx[:, None], axis=1)[:, 0], 0.0)
  return idx, best


def _subspace_batch(m: int, n: int, k: int) -> int:
  return int(max(1, min(m, _ASSIGN_BUDGET_BYTES // max(1, 4 * n * k))))


def _assign(x_sub: jax.Array, centers: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Batched `_assign_one` over subspaces: (m, N, s), (m, K, s) -> (m, N)."""
  m, n, _ = x_sub.shape
  batch = _subspace_batch(m, n, centers.shape[1])
  if batch >= m:
    return jax.vmap(_assign_one)(x_sub, centers)
  return jax.lax.map(lambda a: _assign_one(*a), (x_sub, centers),
                     batch_size=batch)


def _kmeans_pp_one(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) in one subspace.

  Duplicates of chosen points get zero probability, so data with exactly K
  distinct points yields exactly those points as centroids.
  """
  n = x.shape[0]
  key, first_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, n)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.sum((x - x[first]) ** 2, axis=1)

  def body(i, state):
    centers, d2, key = state
    key, sub = jax.random.split(key)
    # All-zero weights (fewer distinct points than K): fall back to uniform.
    weights = jnp.where(jnp.sum(d2) > 0, d2, jnp.ones_like(d2))
    j = jax.random.categorical(sub, jnp.log(weights))
    c = x[j]
    return (centers.at[i].set(c),
            jnp.minimum(d2, jnp.sum((x - c) ** 2, axis=1)), key)

  centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2, key))
  return centers


def _random_init_one(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
  return x[jax.random.choice(key, x.shape[0], (k,), replace=False)]


def _lloyd(x_sub: jax.Array, centers: jax.Array, iterations: int) -> jax.Array:
  """`iterations` Lloyd steps on (m, N, s) data from (m, K, s) centroids.

  A centroid that loses all its points is re-seeded at the point with the
  largest quantisation error (greedily, so that several empty centroids get
  distinct points), so that all K codes stay in use.
  """
  k = centers.shape[1]

  def reseed(x, means, empty, err):
    # Greedy farthest-point seeding of the empty centroids: each pick lowers
    # the errors of its neighbours (to 0 for its duplicates), so distinct
    # empty centroids land on distinct, badly quantised points.
    slots = jnp.nonzero(empty, size=k, fill_value=0)[0]

    def body(state):
      i, centers, err = state
      c = x[jnp.argmax(err)]
      return (i + 1, centers.at[slots[i]].set(c),
              jnp.minimum(err, jnp.sum((x - c) ** 2, axis=1)))

    _, centers, _ = jax.lax.while_loop(
        lambda state: state[0] < jnp.sum(empty), body, (0, means, err))
    return centers

  def update_one(x, c, idx, err):
    sums = jax.ops.segment_sum(x, idx, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(idx, x.dtype), idx,
                                 num_segments=k)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return reseed(x, means, counts == 0, err)

  def body(_, c):
    idx, err = _assign(x_sub, c)
    return jax.vmap(update_one)(x_sub, c, idx, err)

  return jax.lax.fori_loop(0, iterations, body, centers)


@functools.partial(jax.jit, static_argnames=("m", "k", "iterations", "init"))
def _train_codebooks(x_rot: jax.Array, key: jax.Array, *, m: int, k: int,
                     iterations: int, init: str) -> jax.Array:
  x_sub = _split(x_rot, m)
  keys = jax.random.split(key, m)
  init_fn = _kmeans_pp_one if init == "kmeans++" else _random_init_one
  centers = jax.vmap(lambda kk, xx: init_fn(kk, xx, k))(keys, x_sub)
  return _lloyd(x_sub, centers, iterations)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _refine_codebooks(x_rot: jax.Array, codebooks: jax.Array, *,
                      iterations: int) -> jax.Array:
  return _lloyd(_split(x_rot, codebooks.shape[0]), codebooks, iterations)


# ----------------------------------------------------------------------------
# Training.


def train_pq(x: Any, num_subspaces: int, *, num_centroids: int = 256,
             iterations: int = 20, seed: int = 0,
             init: str = "kmeans++") -> ProductQuantizer:
  """Trains a plain product quantizer (Jegou et al. 2011).

  Each of the m subspaces gets its own k-means codebook (jitted and vmapped
  over subspaces; `iterations` Lloyd steps after k-means++ or random seeding).

  Args:
    x: (N, d) floating training vectors (e.g. impostors), N >= num_centroids.
    num_subspaces: m; must divide d. The code size is m bytes per vector
      (8, 16, 32, 64 in the paper's Fig. 2 right).
    num_centroids: K <= 256 centroids per subspace.
    iterations: Lloyd iterations.
    seed: PRNG seed; equal seeds give identical quantizers.
    init: "kmeans++" or "random" (K distinct training points).

  Returns:
    A ProductQuantizer with identity rotation.
  """
  x, m, k, iterations, seed = _check_training_args(
      x, num_subspaces, num_centroids, iterations, seed, init)
  codebooks = _train_codebooks(x, jax.random.PRNGKey(seed), m=m, k=k,
                               iterations=iterations, init=init)
  return ProductQuantizer(codebooks, jnp.eye(x.shape[1], dtype=jnp.float32))


@jax.jit
def _procrustes(x: jax.Array, y_rot: jax.Array) -> jax.Array:
  """argmin_R ||x R - y_rot||_F over orthogonal R: R = U V^T, x^T y = U S V^T."""
  u, _, vt = jnp.linalg.svd(x.T @ y_rot, full_matrices=False)
  return u @ vt


def train_opq(x: Any, num_subspaces: int, *, opq_iterations: int = 10,
              num_centroids: int = 256, iterations: int = 20,
              inner_iterations: int = 4, seed: int = 0,
              init: str = "kmeans++",
              init_rotation: str = "random") -> ProductQuantizer:
  """Trains an optimised product quantizer (Ge et al. 2013, non-parametric).

  Minimises sum_i ||x_i - decode(encode(x_i))||^2 over the codebooks and an
  orthogonal rotation R by alternating (i) `inner_iterations` warm-started
  Lloyd steps on the rotated data x R and (ii) the orthogonal Procrustes
  update R = U V^T with U S V^T = SVD(x^T Y), where Y holds the current
  reconstructions in the rotated space. A final `iterations` Lloyd steps fit
  the codebooks to the last rotation.

  With ``init_rotation="identity"`` the first step is exactly `train_pq` with
  the same seed and every later step does not increase the training error, so
  OPQ's training reconstruction error is never above PQ's.

  Args:
    x: (N, d) floating training vectors, N >= num_centroids.
    num_subspaces: m; must divide d.
    opq_iterations: number of (codebook, rotation) alternations.
    num_centroids: K <= 256 centroids per subspace.
    iterations: Lloyd iterations of the initial and final codebook fits.
    inner_iterations: Lloyd iterations per alternation.
    seed: PRNG seed.
    init: codebook seeding, "kmeans++" or "random".
    init_rotation: "identity" or "random" (a random orthogonal matrix).

  Returns:
    A ProductQuantizer whose rotation is orthogonal.
  """
  x, m, k, iterations, seed = _check_training_args(
      x, num_subspaces, num_centroids, iterations, seed, init)
  opq_iterations = _check_int(opq_iterations, "opq_iterations", 0)
  inner_iterations = _check_int(inner_iterations, "inner_iterations", 1)
  if init_rotation not in OPQ_INIT_ROTATIONS:
    raise ValueError(
        f"`init_rotation` must be one of {OPQ_INIT_ROTATIONS}; got "
        f"{init_rotation!r}.")
  d = x.shape[1]
  key_cb, key_rot = jax.random.split(jax.random.PRNGKey(seed))
  if init_rotation == "identity":
    rotation = jnp.eye(d, dtype=jnp.float32)
  else:
    q, r = jnp.linalg.qr(jax.random.normal(key_rot, (d, d), jnp.float32))
    rotation = q * jnp.sign(jnp.diag(r))[None, :]
  codebooks = _train_codebooks(x @ rotation, key_cb, m=m, k=k,
                               iterations=iterations, init=init)
  for _ in range(opq_iterations):
    pq = ProductQuantizer(codebooks, rotation)
    y_rot = _decode_rotated(codebooks, _encode(pq, x))
    rotation = _procrustes(x, y_rot)
    codebooks = _refine_codebooks(x @ rotation, codebooks,
                                  iterations=inner_iterations)
  if opq_iterations:
    codebooks = _refine_codebooks(x @ rotation, codebooks,
                                  iterations=iterations)
  return ProductQuantizer(codebooks, rotation)


# ----------------------------------------------------------------------------
# Encoding, decoding and asymmetric distances.


@jax.jit
def _encode(pq: ProductQuantizer, x: jax.Array) -> jax.Array:
  idx, _ = _assign(_split(x @ pq.rotation, pq.codebooks.shape[0]),
                   pq.codebooks)
  return idx.T.astype(jnp.uint8)


def encode(pq: ProductQuantizer, x: Any) -> jax.Array:
  """Encodes vectors as PQ codes.

  code_ij = argmin_k ||(x_i R)_j - codebooks[j, k]||^2.

  Args:
    pq: a trained ProductQuantizer.
    x: (N, d) floating vectors.

  Returns:
    (N, m) uint8 codes.
  """
  _check_pq(pq)
  x = _check_matrix(x, "x")
  _check_dim(x, pq, "x")
  return _encode(pq, x)


def _decode_rotated(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """(N, m) codes -> (N, d) reconstructions in the rotated space."""
  m = codebooks.shape[0]
  codes = codes.astype(jnp.int32)
  parts = codebooks[jnp.arange(m)[None, :], codes]         # (N, m, d/m)
  return parts.reshape(codes.shape[0], -1)


@jax.jit
def _decode(pq: ProductQuantizer, codes: jax.Array) -> jax.Array:
  return _decode_rotated(pq.codebooks, codes) @ pq.rotation.T


def decode(pq: ProductQuantizer, codes: Any) -> jax.Array:
  """Reconstructs vectors from PQ codes: concat_j(codebooks[j, code_j]) R^T.

  Args:
    pq: a trained ProductQuantizer.
    codes: (N, m) integer codes (uint8 from `encode`).

  Returns:
    (N, d) float32 reconstructions.
  """
  _check_pq(pq)
  return _decode(pq, _check_codes(codes, pq))


def reconstruct(pq: ProductQuantizer, x: Any) -> jax.Array:
  """decode(pq, encode(pq, x)): the compressed impostors of the paper's
  'fixed' scheme with PQ (Sec. 4, "Impostors compression")."""
  return decode(pq, encode(pq, x))


@jax.jit
def _adc_tables(pq: ProductQuantizer, queries: jax.Array) -> jax.Array:
  q_sub = _split(queries @ pq.rotation, pq.codebooks.shape[0])  # (m, B, s)
  cb = pq.codebooks
  d2 = (jnp.sum(q_sub * q_sub, axis=2)[:, :, None]
        - 2.0 * jnp.einsum("mbs,mks->mbk", q_sub, cb)
        + jnp.sum(cb * cb, axis=2)[:, None, :])
  return jnp.maximum(d2, 0.0).transpose(1, 0, 2)


def adc_tables(pq: ProductQuantizer, queries: Any) -> jax.Array:
  """Asymmetric distance tables (Jegou et al. 2011, ADC).

  tables[b, j, k] = ||(q_b R)_j - codebooks[j, k]||^2.

  Args:
    pq: a trained ProductQuantizer.
    queries: (B, d) floating query embeddings.

  Returns:
    (B, m, K) float32 squared sub-distances.
  """
  _check_pq(pq)
  queries = _check_matrix(queries, "queries")
  _check_dim(queries, pq, "queries")
  return _adc_tables(pq, queries)


@jax.jit
def _lookup(tables: jax.Array, codes: jax.Array) -> jax.Array:
  codes = codes.astype(jnp.int32)

  # One subspace at a time keeps memory at (B, N) instead of (B, N, m).
  def step(acc, inputs):
    table_j, codes_j = inputs                   # (B, K), (N,)
    return acc + jnp.take(table_j, codes_j, axis=1), None

  acc0 = jnp.zeros((tables.shape[0], codes.shape[0]), tables.dtype)
  acc, _ = jax.lax.scan(step, acc0, (tables.transpose(1, 0, 2), codes.T))
  return acc


def adc_squared_distances_from_tables(tables: Any, codes: Any) -> jax.Array:
  """Sums table entries: out[b, i] = sum_j tables[b, j, codes[i, j]].

  Args:
    tables: (B, m, K) float tables from `adc_tables` (compute them once per
      query batch and reuse them for several code shards).
    codes: (N, m) integer codes.

  Returns:
    (B, N) float32 squared distances ||q_b - decode(codes_i)||^2.
  """
  tables = jnp.asarray(tables)
  if tables.ndim != 3:
    raise ValueError(f"`tables` must be (B, m, K); got {tuple(tables.shape)}.")
  if not hasattr(codes, "shape") or not hasattr(codes, "dtype"):
    codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != tables.shape[1]:
    raise ValueError(
        f"`codes` must be (N, m={tables.shape[1]}); got {tuple(codes.shape)}.")
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f"`codes` must be an integer array; got {codes.dtype}.")
  return _lookup(tables, jnp.asarray(codes))


def adc_squared_distances(pq: ProductQuantizer, queries: Any,
                          codes: Any) -> jax.Array:
  """Squared distances from queries to PQ-coded impostors, without decoding.

  ||q_b - decode(codes_i)||^2 = sum_j tables[b, j, codes[i, j]] (R is
  orthogonal), i.e. the ||y - c_j||^2 of eq. (2) of the impostor-networks
  paper for compressed impostors.

  Args:
    pq: a trained ProductQuantizer.
    queries: (B, d) floating query embeddings.
    codes: (N, m) integer codes.

  Returns:
    (B, N) float32 squared distances.
  """
  tables = adc_tables(pq, queries)
  _check_codes(codes, pq)
  return adc_squared_distances_from_tables(tables, codes)


def rbf_log_probs_from_sq_distances(sq_dists: Any, labels: Any, sigma: float,
                                    num_classes: int,
                                    log_weights: Any | None = None) -> jax.Array:
  """RBF class log-probabilities over all N impostors (paper eqs. 2-3).

  A thin wrapper of `fgjax.impostors.rbf_log_probs_from_neighbors` with every
  impostor as a "neighbour", for the (B, N) output of `adc_squared_distances`.

  Args:
    sq_dists: (B, N) squared distances, e.g. from `adc_squared_distances`.
    labels: (N,) integer class labels of the impostors in [0, num_classes).
    sigma: kernel bandwidth (> 0).
    num_classes: C.
    log_weights: optional (N,) impostor log-weights (ImpostorSet.log_weights).

  Returns:
    (B, C) log-probabilities; -inf for classes without impostors.
  """
  from fgjax import impostors  # pylint: disable=g-import-not-at-top
  sq_dists = _check_matrix(sq_dists, "sq_dists")
  indices = jnp.broadcast_to(
      jnp.arange(sq_dists.shape[1], dtype=jnp.int32)[None, :], sq_dists.shape)
  return impostors.rbf_log_probs_from_neighbors(sq_dists, indices, labels,
                                                sigma, num_classes, log_weights)


def nbytes(pq: ProductQuantizer, codes: Any | None = None) -> dict[str, int]:
  """Memory accounting of a compressed impostor set, in bytes.

  Args:
    pq: a trained ProductQuantizer.
    codes: optional (N, m) codes; counted at their stored dtype size.

  Returns:
    dict with "codes", "codebooks", "rotation" and "total" (bytes) and
    "bytes_per_vector" (m for uint8 codes). The rotation is counted even for
    plain PQ (identity), since it is stored in the pytree; the paper's figure
    (16 bytes x 5,994 impostors = 92 KB for Birds) counts the codes only.
  """
  _check_pq(pq)
  out = {
      "codebooks": int(pq.codebooks.size * pq.codebooks.dtype.itemsize),
      "rotation": int(pq.rotation.size * pq.rotation.dtype.itemsize),
      "codes": 0,
      "bytes_per_vector": int(pq.num_subspaces * np.dtype(np.uint8).itemsize),
  }
  if codes is not None:
    codes = _check_codes(codes, pq)
    out["codes"] = int(codes.size * codes.dtype.itemsize)
    out["bytes_per_vector"] = int(codes.shape[1] * codes.dtype.itemsize)
  out["total"] = out["codebooks"] + out["rotation"] + out["codes"]
  return out
