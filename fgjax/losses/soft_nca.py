"""NCA loss and RBF rule over impostors with soft (distribution) labels.

Chervontsev, "Deep Metric Learning and Image Classification with Nearest Neighbour
Gaussian Kernels" (NNGK review), section 4.2: when impostors are dropped or added in
continual learning, the labels of their neighbours are redistributed by eq. (13),
y_j <- y_j + Delta y_j, so an impostor's label becomes a distribution Y_j over the C
classes instead of one class. The RBF rule (impostor paper eq. 3; review eq. 9) and
the NCA loss (impostor paper eq. 4) then read, with the Gaussian kernel of eq. (2),
w_ij = exp(-||y_i - c_j||^2 / (2 sigma^2)):

    p(l | y_i) = sum_j w_ij Y_j[l] / sum_j w_ij,                     (soft eq. 3)
    L_i = -log( sum_{j != e_i} w_ij Y_j[l_i] / sum_{j != e_i} w_ij ).  (soft eq. 4)

With one-hot Y_j = e_{l_j} both are exactly `fgjax.impostors.rbf_log_probs` and
`fgjax.losses.nca_loss`.

Numerics. The loss is computed in log space like `nca_loss`:
L_i = s (d+_i - d_i) + log S_i - log S+_i, s = 1 / (2 sigma^2), with d_i (d+_i) the
smallest distance to a kept center (to a kept center with Y_j[l_i] > 0),
S_i = sum_{j kept} exp(-s (d_ij - d_i)) and
S+_i = sum_{j kept, Y_j[l_i] > 0} Y_j[l_i] exp(-s (d_ij - d+_i)), i.e. the masked
log-sum-exp of log Y_j[l_i] + a_ij shifted by the row's nearest positive center, so
no sum underflows to 0 unless Y itself is below the float range.

Rule for Y_j[l] = 0: center j adds nothing to class l's numerator (its log Y_j[l] =
-inf is masked out of the log-sum-exp, never computed as -inf + a, so values and
gradients stay finite) but still counts in the denominator of every class. A query
whose kept centers all have Y_j[l_i] = 0 has an empty numerator: its loss is 0 with
zero gradient, as in `nca_loss` for a query without a same-class impostor.

Exclusion generalises eq. (4)'s j != i to impostors owned by the query: center j is
bypassed by query i when center_owners[j] == exclude[i] >= 0 (default owners
arange(M): exclude[i] is then a center index, as in `nca_loss`). Continual learning
(fgjax.continual) gives an image several centers (its own impostor and a center added
at its later embedding) and bypasses all of them.

Pure and jit-able; gradients by autodiff (no custom VJP): memory is O(B * M), fine for
the few thousand centers of the continual protocol.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from fgjax.losses import _checks
from fgjax.losses import nca


def _check(queries, centers, center_probs, sigma, exclude, center_owners):
  q = _checks.float_array(queries, "queries", 2)
  c = _checks.float_array(centers, "centers", 2)
  y = _checks.float_array(center_probs, "center_probs", 2)
  _checks.same_dim(q, "queries", c, "centers")
  _checks.same_size(y, "center_probs", 0, c, "centers", 0)
  _checks.positive_scalar(sigma, "sigma")
  if c.shape[0] == 0:
    raise ValueError("`centers` is empty (M = 0); the soft RBF rule needs >= 1 center.")
  m = c.shape[0]
  if center_owners is None:
    owners = jnp.arange(m, dtype=jnp.int32)
  else:
    owners = _checks.int_array(center_owners, "center_owners", 1)
    _checks.same_size(owners, "center_owners", 0, c, "centers", 0)
  if exclude is None:
    ex = jnp.full((q.shape[0],), -1, jnp.int32)
  else:
    ex = _checks.int_array(exclude, "exclude", 1)
    _checks.same_size(ex, "exclude", 0, q, "queries", 0)
  dtype = _checks.compute_dtype(q.dtype, c.dtype, y.dtype)
  return (q.astype(dtype), c.astype(dtype), y.astype(dtype),
          jnp.asarray(sigma, dtype), ex, owners)


def _kept(ex: jax.Array, owners: jax.Array) -> jax.Array:
  """(B, M) bool: center j is not one of query i's own (owner == exclude[i] >= 0)."""
  return ~((owners[None, :] == ex[:, None]) & (ex[:, None] >= 0))


def _shifted_weights(d: jax.Array, mask: jax.Array, scale: jax.Array):
  """(row minimum distance over `mask` (B,), exp(-s (d - min)) on `mask` else 0).

  The shift is a constant of the result (it cancels), so it carries no gradient; the
  double `where` keeps masked entries out of the exp (no inf * 0 in the gradient).
  """
  d_min = lax.stop_gradient(jnp.min(jnp.where(mask, d, jnp.inf), axis=1))
  safe_min = jnp.where(jnp.isfinite(d_min), d_min, 0.0)
  diff = jnp.where(mask, d - safe_min[:, None], 0.0)
  return d_min, jnp.where(mask, jnp.exp(-scale * diff), 0.0)


def soft_nca_loss(queries: jax.Array, query_labels: jax.Array, centers: jax.Array,
                  center_probs: jax.Array, sigma: Any,
                  exclude: Optional[jax.Array] = None,
                  center_owners: Optional[jax.Array] = None) -> jax.Array:
  """Per-query NCA loss with soft center labels (module docstring, soft eq. 4).

      L_i = -log( sum_{j kept} w_ij Y_j[l_i] / sum_{j kept} w_ij ),
      w_ij = exp(-||q_i - c_j||^2 / (2 sigma^2))   (impostor paper eq. 2, 4).

  Args:
    queries: (B, d) float embeddings f(x_i).
    query_labels: (B,) int labels l_i in [0, C).
    centers: (M, d) float impostors c_j.
    center_probs: (M, C) float soft labels Y_j (rows are distributions; NNGK
      review eq. 13 makes them so).
    sigma: scalar kernel width > 0 (may be traced).
    exclude: optional (B,) int: the id whose centers query i bypasses; negative =
      none. With default owners it is a center index (nca_loss's `exclude`).
    center_owners: optional (M,) int id owning each center (negative: nobody);
      default arange(M).

  Returns:
    (B,) float losses (at least float32); 0 for a query with no kept center having
    Y_j[l_i] > 0. Differentiable in queries, centers, sigma (and center_probs).
  """
  q, c, y, sigma, ex, owners = _check(queries, centers, center_probs, sigma, exclude,
                                      center_owners)
  ql = _checks.int_array(query_labels, "query_labels", 1)
  _checks.same_size(ql, "query_labels", 0, q, "queries", 0)
  _checks.labels_in_range(ql, "query_labels", y.shape[1])
  scale = nca.kernel_scale(sigma)
  d = nca.squared_distances(q, c)                                # (B, M)
  keep = _kept(ex, owners)
  y_pos = jnp.take(y, ql, axis=1).T                              # (B, M): Y_j[l_i]
  pos = keep & (y_pos > 0)
  d_all, e_all = _shifted_weights(d, keep, scale)
  d_pos, e_pos = _shifted_weights(d, pos, scale)
  s_all = jnp.sum(e_all, axis=1)
  s_pos = jnp.sum(jnp.where(pos, y_pos, 0.0) * e_pos, axis=1)
  no_pos = ~jnp.isfinite(d_pos)
  gap = jnp.where(no_pos, 0.0, d_pos - jnp.where(jnp.isfinite(d_all), d_all, 0.0))
  loss = (scale * gap + jnp.log(jnp.where(no_pos, 1.0, s_all))
          - jnp.log(jnp.where(no_pos, 1.0, s_pos)))
  return jnp.where(no_pos, 0.0, loss)


def soft_rbf_log_probs(queries: jax.Array, centers: jax.Array, center_probs: jax.Array,
                       sigma: Any, exclude: Optional[jax.Array] = None,
                       center_owners: Optional[jax.Array] = None) -> jax.Array:
  """Log of the RBF rule with soft center labels (module docstring, soft eq. 3).

      p(l | y_i) = sum_{j kept} w_ij Y_j[l] / sum_{j kept} w_ij.

  Computed as (normalised shifted weights) @ Y, one (B, M) x (M, C) matmul: each row's
  weights are shifted by its nearest kept center (weight 1), so the sum is >= 1 and
  never 0/0. A class whose whole kernel mass is below e^-87 of the nearest center's
  (the float32 exp range) gets p = 0 (log -inf), as a float32 sum would; the argmax,
  and every class within that range, are exact. With one-hot Y this is
  `fgjax.impostors.rbf_log_probs` up to that range.

  Args:
    queries: (B, d) float embeddings y.
    centers: (M, d) float impostors.
    center_probs: (M, C) float soft labels.
    sigma: scalar kernel width > 0.
    exclude, center_owners: as in `soft_nca_loss`.

  Returns:
    (B, C) float log-probabilities (rows of exp sum to 1 when the rows of Y do);
    a query whose centers are all excluded gets the uniform distribution.
  """
  q, c, y, sigma, ex, owners = _check(queries, centers, center_probs, sigma, exclude,
                                      center_owners)
  keep = _kept(ex, owners)
  d = nca.squared_distances(q, c)
  _, e = _shifted_weights(d, keep, nca.kernel_scale(sigma))
  s = jnp.sum(e, axis=1, keepdims=True)
  empty = s == 0
  p = jnp.matmul(e, y, precision=lax.Precision.HIGHEST) / jnp.where(empty, 1.0, s)
  num_classes = y.shape[1]
  p = jnp.where(empty, 1.0 / num_classes, p)
  return jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)


__all__ = ["soft_nca_loss", "soft_rbf_log_probs"]
