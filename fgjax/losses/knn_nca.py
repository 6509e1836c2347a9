"""NCA loss over each query's k selected impostors (k-NN impostor training).

Meyer, Harwood & Drummond, "Nearest Neighbour Radial Basis Function Solvers for Deep
Neural Networks" (2017), reviewed in Chervontsev, "Deep Metric Learning and Image
Classification with Nearest Neighbour Gaussian Kernels", eq. (6)-(7): the Gaussian
kernel of a far point is ~0, so the RBF classifier's sums may run over the query's k
nearest neighbours N_k(y) only. Applied to the NCA loss of Lebedev, Babenko &
Lempitsky, "Impostor Networks for Fast Fine-Grained Recognition", eq. (4), with the
kernel of their eq. (2):

    L_i = -log( sum_{j in N_i, j != e_i, l_j = l_i} w_ij / sum_{j in N_i, j != e_i} w_ij ),
    w_ij = exp(-||q_i - c_j||^2 / (2 sigma^2)),

where N_i is the row neighbor_idx[i] of indices into the M centers, chosen by the
caller (the 'knn' impostor policies keep one list per training image, refreshed from
the current embeddings, fgjax.impostor_policies). With N_i = all M centers this is
`nca_loss`.

The numerics are nca_loss's own (`nca.dense_terms`: each log-sum-exp shifted by the
row's minimum distance, so nothing overflows unless the loss does), on a (B, k) block
instead of (B, M). Since the k rows are gathered anyway, distances are direct
differences ||q_i - c_j||^2 of a (B, k, d) tensor (k << M) instead of nca_loss's
matmul expansion, so there is no cancellation either. A custom VJP recomputes the
differences in the backward pass (no (B, k, d) residual) and scatter-adds the centers'
gradient into the selected rows only: a row that no query selected gets exactly 0.
"""
import jax
import jax.numpy as jnp

from fgjax.losses import _checks
from fgjax.losses import nca


def _first_occurrences(idx: jax.Array) -> jax.Array:
  """(B, k) bool: True at the first position of each distinct index of its row."""
  order = jnp.argsort(idx, axis=1, stable=True)
  s = jnp.take_along_axis(idx, order, axis=1)
  # Stable: among equal indices the leftmost comes first in sorted order.
  first = jnp.concatenate([jnp.ones_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], axis=1)
  rows = jnp.arange(idx.shape[0])[:, None]
  return jnp.zeros(idx.shape, bool).at[rows, order].set(first)


def _differences(q, c, safe):
  """c_{N_ij} - q_i, (B, k, d)."""
  return jnp.take(c, safe, axis=0) - q[:, None, :]


def _forward(q, ql, c, cl, idx, sigma, ex, u):
  scale = nca.kernel_scale(sigma)
  m = c.shape[0]
  inside = (idx >= 0) & (idx < m)
  safe = jnp.clip(idx, 0, m - 1)
  diff = _differences(q, c, safe)
  d = jnp.sum(diff * diff, axis=-1)
  # dense_terms reads +inf as "masked": an overflowing distance is NaN instead (the
  # NaN rule of nca_loss), and so is an index out of [0, M) (unchecked under jit),
  # which poisons its row rather than silently reading another center.
  d = jnp.where((d < jnp.inf) & inside, d, jnp.nan)
  labels = jnp.take(cl, safe)
  # j != e_i, each j once, absent rows (negative labels) never.
  keep = _first_occurrences(idx) & (idx != ex[:, None]) & (labels >= 0)
  pos = keep & (labels == ql[:, None])                      # [l_j = l_i]
  # Relative weights over the selected rows: the list's own maximum cancels too.
  w = None if u is None else nca.relative_weights(jnp.take(u, safe))
  loss, dd = nca.dense_terms(d, keep, pos, scale, w)
  return loss, (q, c, safe, sigma, u, dd, jnp.sum(dd * d, axis=1))


@jax.custom_vjp
def _knn_nca(q, ql, c, cl, idx, sigma, ex, u):
  return _forward(q, ql, c, cl, idx, sigma, ex, u)[0]


def _knn_nca_fwd(q, ql, c, cl, idx, sigma, ex, u):
  return _forward(q, ql, c, cl, idx, sigma, ex, u)


def _knn_nca_bwd(res, g):
  # a_ij = -s d_ij + u_j with s = 1 / (2 sigma^2), D_ij = dL_i/da_ij = p_ij - p+_ij:
  #   da_ij/dq_i = 2s (c_j - q_i),  da_ij/dc_j = -2s (c_j - q_i),
  #   da_ij/dsigma = 2s d_ij / sigma,  da_ij/du_j = 1.
  # Elementwise products and sums, not einsum: no TF32/bf16 matmul pass on GPU/TPU.
  q, c, safe, sigma, u, dd, dd_dot_d = res
  scale = nca.kernel_scale(sigma)
  gd = ((2 * scale) * g)[:, None, None] * dd[..., None] * _differences(q, c, safe)
  dq = jnp.sum(gd, axis=1)
  dc = jnp.zeros_like(c).at[safe].add(-gd)
  dsigma = jnp.sum(g * dd_dot_d) * scale * (2.0 / sigma)
  du = None if u is None else jnp.zeros_like(u).at[safe].add(g[:, None] * dd)
  return dq, None, dc, None, None, dsigma.astype(sigma.dtype), None, du


_knn_nca.defvjp(_knn_nca_fwd, _knn_nca_bwd)


def knn_nca_loss(queries, query_labels, centers, center_labels, neighbor_idx, sigma,
                 exclude=None, center_log_weights=None) -> jax.Array:
  """Per-query NCA loss of eq. (4) over each query's k selected impostors.

  Impostor Networks (Lebedev et al.) eq. (4) with the Gaussian kernel of eq. (2),
  the sums restricted to the neighbour list N_i = neighbor_idx[i] (Meyer et al.'s
  k-NN RBF solver; NNGK review eq. 6-7):

      L_i = -log( sum_{j in N_i \\ e_i, l_j = l_i} w_ij / sum_{j in N_i \\ e_i} w_ij ).

  Conventions (the same as `nca_loss` wherever both apply):
    * Exclusion: e_i = exclude[i] (the query's own impostor, the j != i of eq. 4)
      is masked wherever it occurs in N_i; negative = none.
    * Duplicates: N_i is a set. An index listed twice counts once (its first
      occurrence; later ones are masked), so the loss is that of the distinct
      neighbours and does not depend on the order of the list.
    * No positive: a query with no same-class center among its kept neighbours has
      an empty numerator; its loss is 0 with zero gradient (like nca_loss; weigh
      such rows out yourself if you average).
    * Stability: exact to float32 distance rounding for every sigma > 0, +inf only
      where the true loss exceeds the float32 range; gradients scale like
      1 / sigma^2 (1 / sigma^3 for sigma) and overflow accordingly.
    * NaN rule: a NaN or inf in q_i or in a kept neighbour of it, a distance that
      overflows float32, or (under jit, where values are not checked) an index
      outside [0, M) makes L_i NaN, and its gradients NaN. Other rows are unaffected.
    * Absent rows: a neighbour whose center label is negative (padding, as in
      `nca_loss`) is masked like the own impostor.
    * Gradients reach `centers` only in the rows some query kept: every other row's
      gradient is exactly 0.
  With every N_i a permutation of all M centers this equals `nca_loss` (values and
  gradients, to float32 rounding).

  Per-center weights w_j = exp(center_log_weights_j) multiply each kernel value as in
  `nca_loss` (NNGK review eq. 7); their gradient, like the centers', reaches only the
  rows some query kept.

  Differentiable in `queries`, `centers`, `sigma` and `center_log_weights` through a
  custom VJP (reverse mode only). jit/vmap-safe; memory O(B * k * d) besides the
  inputs.

  Args:
    queries: (B, d) float embeddings f(x_i), eq. (1).
    query_labels: (B,) int labels l_i.
    centers: (M, d) float impostors c_j.
    center_labels: (M,) int labels l_j.
    neighbor_idx: (B, k) int, k >= 1: row indices into `centers`, in [0, M).
    sigma: scalar kernel width > 0 of eq. (2).
    exclude: optional (B,) int own-impostor index per query in [0, M); negative =
      none.
    center_log_weights: optional (M,) float u_j, weights w_j = exp(u_j).

  Returns:
    (B,) float losses, in the promoted float dtype (at least float32).

  Raises:
    TypeError/ValueError: wrong ranks, dtypes, mismatched sizes, k = 0, sigma <= 0,
      or (when concrete) `neighbor_idx` outside [0, M) or `exclude` >= M.
  """
  q, ql, c, cl, sigma, ex = nca.check_args(queries, query_labels, centers,
                                           center_labels, sigma, exclude)
  idx = _checks.int_array(neighbor_idx, "neighbor_idx", 2)
  _checks.same_size(idx, "neighbor_idx", 0, q, "queries", 0)
  if idx.shape[1] == 0:
    raise ValueError("`neighbor_idx` has shape (B, 0): each query needs >= 1 "
                     "neighbour (k >= 1).")
  _checks.in_range(idx, "neighbor_idx", 0, c.shape[0], "row indices into `centers`")
  return _knn_nca(q, ql, c, cl, idx, sigma, ex, nca.log_weights_arg(center_log_weights, c))
