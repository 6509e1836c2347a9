"""Impostor sets and the RBF prediction rule of impostor networks.

Lebedev, Babenko & Lempitsky, "Impostor Networks for Fast Fine-Grained
Recognition". A trained network maps an image to y = f(x) (eq. 1) and
classifies it with the RBF rule over M labelled impostors c_j (eq. 2-3):

    w_j = exp(-||y - c_j||^2 / (2 sigma^2)),
    p(l | y) = sum_j w_j [l_j = l] / sum_j w_j.

Everything is computed in log space: log p(l | y) = LSE_{j: l_j = l} a_j -
LSE_j a_j with a_j = log w_j, one log-sum-exp per class, so a small sigma never
underflows to 0/0. Classes without any (non-excluded) impostor get log p = -inf
(p = 0, never NaN); the probabilities of every row sum to 1. The kernel core
(distances, masked/online log-sum-exp, chunk streaming) is shared with
`fgjax.losses.nca`.
"""
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.losses import _checks
from fgjax.losses import nca


class ImpostorSet(NamedTuple):
  """M labelled reference points; a pytree, so it can sit in a params tree.

  Attributes:
    centers: (M, d) float impostors c_j.
    labels: (M,) int32 class labels l_j (mask them out of the optimiser).
    log_weights: None, or (M,) float u_j: impostor j's kernel value is multiplied by
      w_j = exp(u_j) in the rule eq. (3) and the losses (the sample-importance
      weights of the NNGK review, eq. 4 and 7; config.impostors.weights). The log
      keeps every weight positive whatever the optimiser does; u = 0 is the
      unweighted rule.
  """
  centers: jax.Array
  labels: jax.Array
  log_weights: Optional[jax.Array] = None


# The label of an absent row: padding that lets M impostors split evenly over the
# devices of a mesh (fgjax.train_state.Layout). The training losses give such rows no
# weight (fgjax.losses.nca_loss); they never leave the training state (`present`).
ABSENT = -1


def pad_rows(impostors: ImpostorSet, rows: int) -> ImpostorSet:
  """The set with absent rows (zero centers, label ABSENT) appended up to `rows`."""
  extra = rows - impostors.centers.shape[0]
  if extra < 0:
    raise ValueError(f"cannot pad {impostors.centers.shape[0]} impostors to {rows} rows.")
  u = impostors.log_weights
  return ImpostorSet(jnp.pad(impostors.centers, ((0, extra), (0, 0))),
                     jnp.pad(impostors.labels, (0, extra), constant_values=ABSENT),
                     None if u is None else jnp.pad(u, (0, extra)))


def present(impostors: ImpostorSet) -> ImpostorSet:
  """The impostors without the trailing absent rows of `pad_rows` (host arrays)."""
  labels = np.asarray(impostors.labels)
  count = int(np.flatnonzero(labels != ABSENT)[-1]) + 1 if (labels != ABSENT).any() else 0
  u = impostors.log_weights
  return ImpostorSet(np.asarray(impostors.centers)[:count], labels[:count],
                     None if u is None else np.asarray(u)[:count])


def init_impostors(embeddings: jax.Array,
                   labels: jax.Array) -> tuple[ImpostorSet, jax.Array]:
  """Impostors from training embeddings, rescaled to unit mean norm.

  Protocol step 3 of Sec. 4: impostors (and the last layer of the network,
  which the caller divides by the same `scale`) are divided by the average
  impostor L2 norm, scale = (1/M) sum_i ||c_i||, so sigma means the same across
  embedding sizes and initialisations.

  Args:
    embeddings: (M, d) float embeddings f_theta0(x_i) of the training images,
      in training-index order (impostor i belongs to image i).
    labels: (M,) int labels.

  Returns:
    (ImpostorSet(centers / scale, labels as int32), scale) with `scale` a float
    scalar array.

  Raises:
    ValueError: shapes disagree, M = 0, or (when concrete) the mean norm is
      0 or not finite (all-zero embeddings: nothing to rescale). Under tracing
      a zero scale is replaced by 1 so no NaN/inf is produced.
  """
  emb = _checks.float_array(embeddings, "embeddings", 2)
  lab = _checks.int_array(labels, "labels", 1)
  _checks.same_size(lab, "labels", 0, emb, "embeddings", 0)
  if emb.shape[0] == 0:
    raise ValueError("`embeddings` is empty (M = 0); need >= 1 training embedding.")
  scale = jnp.mean(jnp.linalg.norm(emb.astype(_checks.compute_dtype(emb.dtype)),
                                   axis=-1))
  if _checks.is_concrete(scale):
    v = float(scale)
    if not (v > 0 and v < float("inf")):
      raise ValueError(
          f"mean L2 norm of `embeddings` is {v}; impostors cannot be rescaled. "
          "Check that the network outputs non-zero, finite embeddings.")
  else:
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  centers = (emb / scale).astype(emb.dtype)
  return ImpostorSet(centers, lab), scale


def _normalise(class_lse: jax.Array) -> jax.Array:
  """(B, C) per-class log-sum-exp -> log-probabilities (rows sum to 1).

  A row whose classes are all -inf (every impostor excluded) becomes uniform.
  """
  c = class_lse.shape[-1]
  total = nca.masked_logsumexp(class_lse, jnp.isfinite(class_lse))
  empty = ~jnp.isfinite(total)
  out = class_lse - jnp.where(empty, 0.0, total)[:, None]
  return jnp.where(empty[:, None], -jnp.log(float(c)), out)


def _class_lse_block(m, s, logits, labels, num_classes):
  """Online per-class log-sum-exp update with one block of shared-label logits.

  m, s: (C, B) running max and scaled sum; logits: (B, n); labels: (n,).
  Returns the updated (m, s).
  """
  lt = logits.T                                             # (n, B)
  blk_max = jax.ops.segment_max(lt, labels, num_segments=num_classes)

  def block_sum(shift):                                     # shift: (C, B)
    e = jnp.exp(jnp.minimum(lt - jnp.take(shift, labels, axis=0), 0.0))
    e = jnp.where(jnp.isfinite(lt), e, 0.0)
    return jax.ops.segment_sum(e, labels, num_segments=num_classes)

  return nca.online_logsumexp(m, s, blk_max, block_sum)


def _finish(m, s):
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  return jnp.log(s) + shift


def rbf_log_probs(queries: jax.Array, impostors: ImpostorSet, sigma: Any,
                  num_classes: int, exclude: Optional[jax.Array] = None,
                  chunk_size: Optional[int] = None) -> jax.Array:
  """Log of the RBF prediction rule, eq. (3), over all M impostors.

  log p(l | y_i) = LSE_{j: l_j = l, j != e_i} a_ij - LSE_{j != e_i} a_ij,
  a_ij = -||y_i - c_j||^2 / (2 sigma^2) (eq. 2), one stable log-sum-exp per
  class; with impostor weights a_ij + log w_j (NNGK review eq. 7).

  Args:
    queries: (B, d) float embeddings y.
    impostors: ImpostorSet, centers (M, d), labels (M,) in [0, num_classes),
      optional log_weights (M,).
    sigma: scalar kernel width > 0 (may be traced).
    num_classes: C, a Python int (static under jit).
    exclude: optional (B,) int impostor index each query bypasses (e.g. a
      training image's own impostor, as in eq. 4); negative = none.
    chunk_size: optional int; stream over M in blocks (memory O(B * chunk)).

  Returns:
    (B, C) float log-probabilities; -inf for classes with no impostor
    (probability exactly 0); rows of exp(.) sum to 1. A query with every
    impostor excluded gets the uniform distribution.
  """
  q = _checks.float_array(queries, "queries", 2)
  centers = _checks.float_array(impostors.centers, "impostors.centers", 2)
  labels = _checks.int_array(impostors.labels, "impostors.labels", 1)
  _checks.same_size(labels, "impostors.labels", 0, centers, "impostors.centers", 0)
  _checks.same_dim(q, "queries", centers, "impostors.centers")
  _checks.positive_scalar(sigma, "sigma")
  num_classes = _checks.num_classes_arg(num_classes)
  _checks.labels_in_range(labels, "impostors.labels", num_classes)
  m_total = centers.shape[0]
  if exclude is None:
    ex = jnp.full((q.shape[0],), -1, jnp.int32)
  else:
    ex = _checks.int_array(exclude, "exclude", 1)
    _checks.same_size(ex, "exclude", 0, q, "queries", 0)
    _checks.in_range(ex, "exclude", -(2**31), m_total,
                     "impostor indices; negative means exclude nothing")
  chunk = _checks.chunk_size_arg(chunk_size, m_total) or max(m_total, 1)
  dtype = _checks.compute_dtype(q.dtype, centers.dtype)
  q = q.astype(dtype)
  centers = centers.astype(dtype)
  scale = 0.5 / jnp.square(jnp.asarray(sigma, dtype))
  qq = jnp.sum(q * q, axis=-1)
  cc = jnp.sum(centers * centers, axis=-1)
  u = nca.log_weights_arg(impostors.log_weights, centers)

  def body(carry, start, c_blk, extras):
    cc_blk, l_blk = extras[:2]
    logits = -scale * nca.squared_distances_from_norms(q, qq, c_blk, cc_blk)
    if u is not None:
      logits = logits + extras[2][None, :]
    cols = start + jnp.arange(c_blk.shape[0])
    logits = jnp.where(cols[None, :] == ex[:, None], -jnp.inf, logits)
    return _class_lse_block(*carry, logits, l_blk, num_classes), None

  b = q.shape[0]
  init = (jnp.full((num_classes, b), -jnp.inf, dtype),
          jnp.zeros((num_classes, b), dtype))
  extras = (cc, labels) if u is None else (cc, labels, u)
  (m, s), _ = nca.scan_chunks(body, init, centers, extras, chunk)
  return _normalise(_finish(m, s).T)


def rbf_log_probs_from_neighbors(sq_dists: jax.Array, indices: jax.Array,
                                 impostor_labels: jax.Array, sigma: Any,
                                 num_classes: int,
                                 log_weights: Optional[jax.Array] = None) -> jax.Array:
  """Eq. (3) restricted to the k nearest impostors found by a search index.

  p(l | y) = sum_{j in N_k(y)} w_j [l_j = l] / sum_{j in N_k(y)} w_j
  (Sec. 3.1; eq. 9 of the NNGK review), in log space per class.

  Args:
    sq_dists: (B, k) float squared L2 distances ||y - c_j||^2 (+inf entries,
      e.g. padding, get weight 0).
    indices: (B, k) int impostor indices in [0, M).
    impostor_labels: (M,) int labels in [0, num_classes).
    sigma: scalar kernel width > 0.
    num_classes: C, a Python int.
    log_weights: optional (M,) float impostor log-weights (ImpostorSet.log_weights).

  Returns:
    (B, C) float log-probabilities; -inf for classes with no neighbour.

  Raises:
    ValueError: shapes disagree, k > M, indices or labels out of range (when
      concrete), sigma <= 0 (when concrete).
  """
  d2 = _checks.float_array(sq_dists, "sq_dists", 2)
  idx = _checks.int_array(indices, "indices", 2)
  labels = _checks.int_array(impostor_labels, "impostor_labels", 1)
  if tuple(idx.shape) != tuple(d2.shape):
    raise ValueError(f"`indices` has shape {tuple(idx.shape)} but `sq_dists` has "
                     f"{tuple(d2.shape)}; both must be (B, k).")
  m_total = labels.shape[0]
  if idx.shape[1] > m_total:
    raise ValueError(f"k = {idx.shape[1]} neighbours (`indices` axis 1) exceeds "
                     f"the M = {m_total} impostors of `impostor_labels`; "
                     "use k <= M.")
  _checks.positive_scalar(sigma, "sigma")
  num_classes = _checks.num_classes_arg(num_classes)
  _checks.in_range(idx, "indices", 0, m_total, "impostor indices")
  _checks.labels_in_range(labels, "impostor_labels", num_classes)
  dtype = _checks.compute_dtype(d2.dtype)
  if log_weights is not None:
    log_weights = _checks.float_array(log_weights, "log_weights", 1).astype(dtype)
    _checks.same_size(log_weights, "log_weights", 0, labels, "impostor_labels", 0)
  return _neighbor_rule(d2.astype(dtype), idx, labels, jnp.asarray(sigma, dtype),
                        num_classes, log_weights)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _neighbor_rule(d2, idx, labels, sigma, num_classes, log_weights=None):
  # One compiled call: op-by-op dispatch of these few ops cost ~3 ms a call on CPU,
  # 20x a single ScaNN query (benchmarks/timing.py); inside an outer jit it inlines.
  dtype = d2.dtype
  logits = -d2 / (2.0 * jnp.square(sigma))
  if log_weights is not None:
    logits = logits + jnp.take(log_weights, idx, axis=0)
  nb_labels = jnp.take(labels, idx, axis=0)                       # (B, k)
  b = logits.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], nb_labels.shape)
  cmax = jnp.full((b, num_classes), -jnp.inf, dtype).at[rows, nb_labels].max(logits)
  shift = jnp.where(jnp.isfinite(cmax), cmax, 0.0)
  e = jnp.exp(jnp.minimum(logits - shift[rows, nb_labels], 0.0))
  e = jnp.where(jnp.isfinite(logits), e, 0.0)
  sums = jnp.zeros((b, num_classes), dtype).at[rows, nb_labels].add(e)
  return _normalise(jnp.log(sums) + shift)


def entropy_from_log_probs(log_probs: jax.Array) -> jax.Array:
  """Natural-log predictive entropy H = -sum_l p_l log p_l of each row.

  The open-set score of Sec. 4.2 (unseen classes give flatter RBF
  distributions). -inf entries (p = 0) contribute 0, so one-hot rows give
  exactly 0, with finite gradients.

  Args:
    log_probs: (..., C) float log-probabilities (e.g. `rbf_log_probs`).

  Returns:
    (...,) float entropies in [0, log C].
  """
  lp = _checks.float_array(log_probs, "log_probs", jnp.ndim(log_probs))
  if lp.ndim < 1:
    raise ValueError("`log_probs` must have a class axis; got a scalar.")
  finite = jnp.isfinite(lp)
  safe = jnp.where(finite, lp, 0.0)
  return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


def entropy_from_probs(probs: jax.Array) -> jax.Array:
  """Natural-log entropy of each row of (..., C) probabilities (0 log 0 = 0)."""
  p = _checks.float_array(probs, "probs", jnp.ndim(probs))
  if p.ndim < 1:
    raise ValueError("`probs` must have a class axis; got a scalar.")
  pos = p > 0
  safe = jnp.where(pos, p, 1.0)
  return -jnp.sum(jnp.where(pos, p * jnp.log(safe), 0.0), axis=-1)


__all__ = [
    "ImpostorSet", "init_impostors", "rbf_log_probs",
    "rbf_log_probs_from_neighbors", "entropy_from_log_probs", "entropy_from_probs",
]
