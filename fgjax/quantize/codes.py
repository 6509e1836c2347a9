"""The product quantizer type, its argument checks, encoding, decoding and ADC.

Conventions: vectors are rows; the rotated vector is ``x @ rotation``; a code decodes
to ``concat_j(codebooks[j, code_j]) @ rotation.T``. Because the rotation is orthogonal,
||q - decode(code)||^2 = sum_j ||(q R)_j - codebooks[j, code_j]||^2: asymmetric
distance computation (ADC) evaluates it from per-query lookup tables of shape (m, 256)
without decoding any impostor, and those squared distances plug straight into the RBF
rule (impostor networks eqs. 2-3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.losses import _checks
from fgjax.quantize import kmeans

MAX_CENTROIDS = 256  # codes are uint8
INIT_METHODS = ("kmeans++", "random")
OPQ_INIT_ROTATIONS = ("identity", "random")


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


def check_matrix(x: Any, name: str) -> jax.Array:
  return jnp.asarray(_checks.check_float_array(x, name, 2), jnp.float32)


def check_int(value: Any, name: str, minimum: int) -> int:
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


# ----------------------------------------------------------------------------
# Encoding, decoding and asymmetric distances.


@jax.jit
def encode_unchecked(pq: ProductQuantizer, x: jax.Array) -> jax.Array:
  idx, _ = kmeans.assign(kmeans.split(x @ pq.rotation, pq.codebooks.shape[0]),
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
  x = check_matrix(x, "x")
  _check_dim(x, pq, "x")
  return encode_unchecked(pq, x)


def decode_rotated(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """(N, m) codes -> (N, d) reconstructions in the rotated space."""
  m = codebooks.shape[0]
  codes = codes.astype(jnp.int32)
  parts = codebooks[jnp.arange(m)[None, :], codes]         # (N, m, d/m)
  return parts.reshape(codes.shape[0], -1)


@jax.jit
def _decode(pq: ProductQuantizer, codes: jax.Array) -> jax.Array:
  return decode_rotated(pq.codebooks, codes) @ pq.rotation.T


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
  q_sub = kmeans.split(queries @ pq.rotation, pq.codebooks.shape[0])  # (m, B, s)
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
  queries = check_matrix(queries, "queries")
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
  sq_dists = check_matrix(sq_dists, "sq_dists")
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
