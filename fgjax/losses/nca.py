"""NCA loss with the Gaussian (RBF) kernel, and the kernel core it shares.

Lebedev, Babenko & Lempitsky, "Impostor Networks for Fast Fine-Grained
Recognition": a query y is compared with M reference points ("impostors") c_j
through the Gaussian kernel of eq. (2)

    w_j = exp(-||y - c_j||^2 / (2 sigma^2)),

and trained with the NCA loss of eq. (4) (Goldberger et al. 2005; the loose
scheme's eq. (6) adds an attachment term, see `center.py`):

    L_i = -log( sum_{j != i, l_j = l_i} w_ij / sum_{j != i} w_ij ).

The kernel helpers work on logits a_ij = -||y_i - c_j||^2 / (2 sigma^2) with
log-sum-exp. `nca_loss` shifts each log-sum-exp by the row's minimum distance
before scaling, so it stays exact, and equal in eager, jit and chunked modes,
for every sigma > 0 (+inf only where the loss itself overflows float32). Distances use
the expansion ||q||^2 + ||c||^2 - 2 q.c^T: one (B, d) x (d, M) matmul, never a
(B, M, d) tensor. `nca_loss` has a custom VJP whose backward pass is two more
matmuls (dq = D c, dc = D^T q) and, with `chunk_size`, streams over M with an
online log-sum-exp in both passes so memory is O(B * chunk_size + M * d).

`squared_distances`, `rbf_logits`, `masked_logsumexp` and `scan_chunks` are the
building blocks `fgjax.impostors` reuses for the RBF prediction rule, eq. (3);
`dense_terms` and `kernel_scale` the stable core `fgjax.losses.knn_nca` reuses for
the loss over each query's k nearest impostors.
"""
import functools
from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp

from fgjax.losses import _checks


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis, with a finite gradient at x = 0.

  The obvious `x / jnp.maximum(jnp.linalg.norm(x), eps)` has the same value and a NaN
  gradient at x = 0: the norm's derivative there is 0 / 0, and the clamp's zero times
  NaN stays NaN. A ReLU attention map that is zero over a whole image reaches x = 0 in
  training (BAP, BENCHMARKS 17). Here the clamp acts on the squared norm, whose
  derivative at 0 is 0. The norm is computed in float32 at least.

  Args:
    x: (..., D) float.
    eps: the smallest norm divided by.
  Returns:
    (..., D) of x's dtype: unit rows, zero rows stay zero.
  """
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 sums lose digits
  sq = jnp.sum(jnp.square(wide), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps)).astype(x.dtype)


def squared_distances(queries: jax.Array, centers: jax.Array) -> jax.Array:
  """Pairwise squared L2 distances ||q_i - c_j||^2, clamped at 0.

  Args:
    queries: (B, d) float.
    centers: (M, d) float.

  Returns:
    (B, M) float, computed as ||q||^2 + ||c||^2 - 2 q.c^T (one matmul at
    HIGHEST precision: on TPU/GPU the default bf16/tf32 passes would swamp the
    small distances a small sigma resolves).
  """
  qq = jnp.sum(queries * queries, axis=-1)
  cc = jnp.sum(centers * centers, axis=-1)
  return squared_distances_from_norms(queries, qq, centers, cc)


def squared_distances_from_norms(q: jax.Array, qq: jax.Array, c: jax.Array,
                                 cc: jax.Array) -> jax.Array:
  """`squared_distances` given precomputed squared norms qq (B,) and cc (M,)."""
  qc = jnp.matmul(q, c.T, precision=lax.Precision.HIGHEST)
  return jnp.maximum(qq[:, None] + cc[None, :] - 2.0 * qc, 0.0)


def rbf_logits(queries: jax.Array, centers: jax.Array, sigma: Any) -> jax.Array:
  """Log Gaussian-kernel weights a_ij = -||q_i - c_j||^2 / (2 sigma^2), eq. (2).

  Args:
    queries: (B, d) float.
    centers: (M, d) float.
    sigma: scalar kernel width > 0.

  Returns:
    (B, M) float logits (<= 0).
  """
  return -squared_distances(queries, centers) / (2.0 * jnp.square(sigma))


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """log sum_{mask} exp(x) along `axis`; -inf (not NaN) where the mask is empty."""
  m = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - m, 0.0)), 0.0), axis=axis)
  return jnp.log(s) + jnp.squeeze(m, axis)


def online_logsumexp(m: jax.Array, s: jax.Array, block_max: jax.Array,
                     block_sum_fn: Callable[[jax.Array], jax.Array]):
  """One step of a streaming log-sum-exp: (max, sum of exp(x - max)) pairs.

  Args:
    m: running max (any shape; -inf before any element).
    s: running sum of exp(x - safe(m)), same shape.
    block_max: max of the new block, same shape (-inf for an empty block).
    block_sum_fn: maps the new shift (same shape) to the block's
      sum of exp(x - shift).

  Returns:
    Updated (m, s); the log-sum-exp is log(s) + safe(m), with
    safe(m) = m where finite else 0 (so empty sets give log 0 = -inf, not NaN).
  """
  new_m = jnp.maximum(m, block_max)
  shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
  # m <= new_m, so the rescale factor is <= 1; an empty running set (m = -inf)
  # contributes 0 (exp of a shift difference could overflow to inf * 0 = NaN).
  factor = jnp.where(jnp.isfinite(m), jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0)
                                              - shift), 0.0)
  s = s * factor + block_sum_fn(shift)
  return new_m, s


def scan_chunks(body: Callable, carry: Any, centers: jax.Array, extras: tuple,
                chunk_size: int, out: Optional[jax.Array] = None):
  """Runs `body` over consecutive row blocks of `centers` (and `extras`).

  Full blocks go through `lax.scan` with `dynamic_slice` (no padded copy of
  the centers); the remainder, if any, is one more static call. Per-block
  outputs are written in place into `out` (dynamic_update_slice on a loop
  carry, which XLA aliases), so no (M, ...) stack of blocks plus a
  concatenated copy is ever held.

  Args:
    body: (carry, start, c_block, extras_block) -> (carry, out_block or None);
      `start` is the global row index of the block's first row.
    carry: initial carry.
    centers: (M, d).
    extras: tuple of arrays with leading axis M, sliced alongside.
    chunk_size: rows per block.
    out: optional (M, ...) buffer, or tuple of them, the per-block outputs (of the
      same structure) are written into.

  Returns:
    (carry, out) with `out` filled (None when not given).
  """
  m = centers.shape[0]
  n_full, rem = divmod(m, chunk_size)

  def run(state, start, blk, ex):
    carry, buf = state
    carry, y = body(carry, start, blk, ex)
    if buf is not None:
      buf = jax.tree.map(
          lambda b, v: lax.dynamic_update_slice_in_dim(b, v.astype(b.dtype), start, 0),
          buf, y)
    return carry, buf

  def step(state, i):
    start = i * chunk_size
    blk = lax.dynamic_slice_in_dim(centers, start, chunk_size)
    ex = tuple(lax.dynamic_slice_in_dim(e, start, chunk_size) for e in extras)
    return run(state, start, blk, ex), None

  state = (carry, out)
  if n_full:
    state, _ = lax.scan(step, state, jnp.arange(n_full))
  if rem:
    start = n_full * chunk_size
    state = run(state, start, centers[start:], tuple(e[start:] for e in extras))
  return state


# ---- NCA loss ------------------------------------------------------------------------
# The loss works on distances, not logits: each log-sum-exp is shifted by its row's
# minimum *distance* (d - d_min, then one multiply by 1 / (2 sigma^2)). Shifting
# logits instead (a - max a) let XLA contract -s*d - m into an FMA in the fusion
# that sums but not in the one that took the max, so under jit the nearest
# center's "exp(0)" became exp of the product's rounding error (~ulp(s d), tens
# to thousands at sigma = 1e-5): zero or inf sums, losses 0 or -inf. d - d_min has
# no product to contract, so the nearest entry weighs exactly 1 in every mode.
# +inf marks masked entries; real distances are finite or NaN, and NaN
# propagates through the min and the sums.
def _block_terms(q, qq, ql, ex, c, cc, cl, start):
  """Distances and the masks of one block of centers."""
  d = squared_distances_from_norms(q, qq, c, cc)
  # An inf input can give an +inf distance, which would read as "masked".
  d = jnp.where(d < jnp.inf, d, jnp.nan)
  cols = start + jnp.arange(c.shape[0])
  # eq. (4): j != i, and absent rows (negative labels: padding) are no impostors.
  keep = (cols[None, :] != ex[:, None]) & (cl[None, :] >= 0)
  pos = keep & (cl[None, :] == ql[:, None])         # [l_j = l_i]
  return d, keep, pos


def _scaled(t, scale):
  """t * scale for t >= 0, exactly 0 at t = 0 even where scale overflowed to inf."""
  return jnp.where(t == 0, 0.0, t * scale)


def _masked_min(d, mask):
  return jnp.min(jnp.where(mask, d, jnp.inf), axis=1)


def _weights(d, d_min, mask, scale, w=None):
  """w_j exp(-scale (d_ij - d_min_i)) on `mask`, else 0; each value is <= 1.

  w: None (all 1) or the centers' relative weights in (0, 1], broadcastable to d
  (`relative_weights`).
  """
  e = jnp.exp(-_scaled(d - d_min[:, None], scale))
  return jnp.where(mask, e if w is None else e * w, 0.0)


def relative_weights(log_weights):
  """exp(u_j - max u): per-center weights w_j = exp(u_j) (NNGK review eq. 4 / 7) up
  to one factor, which cancels in every ratio of eq. (3) / (4) and keeps each weight
  <= 1 so the shifted sums cannot overflow. None stays None (unweighted)."""
  if log_weights is None:
    return None
  return jnp.exp(log_weights - lax.stop_gradient(jnp.max(log_weights)))


def _inverse_sums(d_pos, s_all, s_pos):
  """1/s_all and 1/s_pos, 0 for rows without a positive (their D = 0)."""
  no_pos = d_pos == jnp.inf
  return (jnp.where(no_pos, 0.0, 1.0 / s_all), jnp.where(no_pos, 0.0, 1.0 / s_pos))


def _loss(d_all, s_all, d_pos, s_pos, scale):
  """L_i = (d+_i - d_i) / (2 sigma^2) + log s_all_i - log s_pos_i, eq. (4).

  d_i, d+_i are the row's minimum distances over all kept and over positive
  centers, s_all, s_pos the sums of their shifted weights. No positive: 0,
  unless the row saw a NaN.
  """
  loss = _scaled(d_pos - d_all, scale) + jnp.log(s_all) - jnp.log(s_pos)
  return jnp.where((d_pos == jnp.inf) & ~jnp.isnan(d_all), 0.0, loss)


def _stream_min_sum(d_min, s, d, mask, scale, w=None):
  """Folds one block into a running (min distance, sum of shifted weights)."""
  new_min = jnp.minimum(d_min, _masked_min(d, mask))
  # Nothing seen yet (d_min = +inf, s = 0): skip the rescale, whose
  # inf - inf would be NaN.
  carried = jnp.where(d_min == jnp.inf, 0.0,
                      s * jnp.exp(-_scaled(d_min - new_min, scale)))
  return new_min, carried + jnp.sum(_weights(d, new_min, mask, scale, w), axis=1)


def dense_terms(d, keep, pos, scale, w=None):
  """Per-row loss and D = dL/da (B, n) over one dense (B, n) block of distances.

  The unchunked core of `nca_loss`, shared with `fgjax.losses.knn_nca` (there the n
  columns are a query's own k neighbours). d: squared distances (+inf never, NaN
  allowed); keep / pos: the kept and the same-class kept entries; scale:
  `kernel_scale(sigma)`; w: None or the centers' relative weights broadcastable to
  d (`relative_weights`). D_ij = p_ij - p+_ij is 0 off `keep` and on rows without a
  positive; with weights a_ij = -scale d_ij + log w_j, so D is also dL/dlog w_j.
  """
  d_all, d_pos = _masked_min(d, keep), _masked_min(d, pos)
  # Each exp once: the weights give both sums and D = p - p+.
  e_all = _weights(d, d_all, keep, scale, w)
  e_pos = _weights(d, d_pos, pos, scale, w)
  s_all, s_pos = jnp.sum(e_all, axis=1), jnp.sum(e_pos, axis=1)
  inv_all, inv_pos = _inverse_sums(d_pos, s_all, s_pos)
  dd = e_all * inv_all[:, None] - e_pos * inv_pos[:, None]
  return _loss(d_all, s_all, d_pos, s_pos, scale), dd


def kernel_scale(sigma):
  """1 / (2 sigma^2) as (sqrt(1/2) / sigma)^2.

  sigma^2 is a float32 subnormal, flushed to 0 on CPU, from sigma ~ 1e-19 on,
  where the loss is still representable. (0.5 / sigma / sigma does not help:
  XLA rewrites it to 0.5 / (sigma * sigma) under jit.)
  """
  return jnp.square(0.5**0.5 / sigma)


def _nca_forward(q, ql, c, cl, sigma, ex, u, chunk_size):
  scale = kernel_scale(sigma)
  qq = jnp.sum(q * q, axis=-1)
  cc = jnp.sum(c * c, axis=-1)
  w = relative_weights(u)
  if chunk_size is None:
    d, keep, pos = _block_terms(q, qq, ql, ex, c, cc, cl, 0)
    loss, dd = dense_terms(d, keep, pos, scale, None if w is None else w[None, :])
    # Row sums of D * d: all the sigma-gradient needs (d is not kept).
    return loss, (q, c, sigma, u, dd, jnp.sum(dd * d, axis=1))

  b = q.shape[0]
  inf = jnp.full((b,), jnp.inf, q.dtype)
  zeros = jnp.zeros((b,), q.dtype)

  def body(carry, start, c_blk, extras):
    d_all, s_all, d_pos, s_pos = carry
    d, keep, pos = _block_terms(q, qq, ql, ex, c_blk, extras[0], extras[1], start)
    w_blk = extras[2][None, :] if w is not None else None
    d_all, s_all = _stream_min_sum(d_all, s_all, d, keep, scale, w_blk)
    d_pos, s_pos = _stream_min_sum(d_pos, s_pos, d, pos, scale, w_blk)
    return (d_all, s_all, d_pos, s_pos), None

  extras = (cc, cl) if w is None else (cc, cl, w)
  (d_all, s_all, d_pos, s_pos), _ = scan_chunks(
      body, (inf, zeros, inf, zeros), c, extras, chunk_size)
  inv_all, inv_pos = _inverse_sums(d_pos, s_all, s_pos)
  residuals = (q, ql, c, cl, sigma, ex, u, d_all, d_pos, inv_all, inv_pos)
  return _loss(d_all, s_all, d_pos, s_pos, scale), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _nca(q, ql, c, cl, sigma, ex, u, chunk_size):
  return _nca_forward(q, ql, c, cl, sigma, ex, u, chunk_size)[0]


def _nca_fwd(q, ql, c, cl, sigma, ex, u, chunk_size):
  return _nca_forward(q, ql, c, cl, sigma, ex, u, chunk_size)


def _nca_bwd(chunk_size, res, g):
  # a_ij = -s d_ij + log w_j, s = 1 / (2 sigma^2), D_ij = dL_i/da_ij = p_ij - p+_ij:
  #   da_ij/dq_i = 2s (c_j - q_i),  da_ij/dc_j = 2s (q_i - c_j),
  #   da_ij/dsigma = 2s d_ij / sigma,  da_ij/du_j = 1 (u = log w).
  if chunk_size is None:
    q, c, sigma, u, dd, dd_dot_d = res
    scale = kernel_scale(sigma)
    # g scales rows of D: fold it into the (B, d) operands, not the (B, M) one.
    # The -sum_j D_ij q_i term of dq vanishes: rows of D sum to 0.
    g_dd = g @ dd
    dq = ((2 * scale) * g)[:, None] * (dd @ c)
    dc = 2 * scale * (dd.T @ (g[:, None] * q) - g_dd[:, None] * c)
    dsigma = jnp.sum(g * dd_dot_d) * scale * (2.0 / sigma)
    du = None if u is None else g_dd.astype(u.dtype)
    return dq, None, dc, None, dsigma.astype(sigma.dtype), None, du

  q, ql, c, cl, sigma, ex, u, d_all, d_pos, inv_all, inv_pos = res
  scale = kernel_scale(sigma)
  qq = jnp.sum(q * q, axis=-1)
  cc = jnp.sum(c * c, axis=-1)
  w = relative_weights(u)

  def body(carry, start, c_blk, extras):
    dq_acc, ds_acc = carry
    d, keep, pos = _block_terms(q, qq, ql, ex, c_blk, extras[0], extras[1], start)
    w_blk = extras[2][None, :] if w is not None else None
    dg = (_weights(d, d_all, keep, scale, w_blk) * inv_all[:, None]
          - _weights(d, d_pos, pos, scale, w_blk) * inv_pos[:, None]) * g[:, None]
    dq_acc = dq_acc + dg @ c_blk  # sum_j D_ij q_i = 0 over all blocks
    ds_acc = ds_acc + jnp.sum(dg * d)
    col_sums = jnp.sum(dg, axis=0)
    dc_blk = 2 * scale * (dg.T @ q - col_sums[:, None] * c_blk)
    return (dq_acc, ds_acc), (dc_blk if w is None else (dc_blk, col_sums))

  extras = (cc, cl) if w is None else (cc, cl, w)
  out = jnp.zeros_like(c) if w is None else (jnp.zeros_like(c), jnp.zeros_like(u))
  (dq, dsum), grads = scan_chunks(body, (jnp.zeros_like(q), jnp.zeros((), q.dtype)),
                                  c, extras, chunk_size, out=out)
  dc, du = (grads, None) if w is None else grads
  dsigma = dsum * scale * (2.0 / sigma)
  return 2 * scale * dq, None, dc, None, dsigma.astype(sigma.dtype), None, du


_nca.defvjp(_nca_fwd, _nca_bwd)


def nca_loss(queries: jax.Array, query_labels: jax.Array, centers: jax.Array,
             center_labels: jax.Array, sigma: Any,
             exclude: Optional[jax.Array] = None,
             chunk_size: Optional[int] = None,
             center_log_weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-query NCA loss -log p(correct class) of the RBF rule, eq. (4) / (6).

  Lebedev et al., Impostor Networks, eq. (4) with the Gaussian kernel of
  eq. (2):

      L_i = -log( sum_{j != e_i, l_j = l_i} w_ij / sum_{j != e_i} w_ij ),
      w_ij = exp(-||q_i - c_j||^2 / (2 sigma^2)).

  Equals pytorch-metric-learning's `NCALoss(softmax_scale=1 / (2 sigma^2))`
  with `LpDistance(power=2, normalize_embeddings=False)`, per element.

  Computed as L_i = (d+_i - d_i) / (2 sigma^2) + log S_i - log S+_i, with
  d_i (d+_i) the smallest distance to a kept (same-class kept) center and
  S_i = sum_{j != e_i} exp(-(d_ij - d_i) / (2 sigma^2)) (S+_i likewise), so
  nothing overflows unless the loss does: values are exact to float32
  distance rounding for every sigma > 0, +inf only where the true loss
  exceeds the float32 range. Gradients scale like 1 / sigma^2 (1 / sigma^3
  for sigma) and overflow accordingly.

  Absent rows: a center whose label is negative is not an impostor (the padding
  that splits M evenly over devices, fgjax.impostors.pad_rows): it weighs 0 in both
  sums and gets a zero gradient, whatever its coordinates.

  Per-center weights (NNGK review eq. 4 and 7, the sample-importance alpha_j / w_j
  of Meyer et al.): with `center_log_weights` u, every kernel value is multiplied
  by w_j = exp(u_j), i.e. w_ij above becomes exp(u_j) w_ij. Parametrised by the log
  so any real u gives a positive weight; u = 0 is the unweighted loss. Only
  differences of u matter (a common factor cancels in the ratio); weights that
  differ by more than e^87 underflow to 0 in float32.

  A query with no same-class center (after exclusion) has an empty numerator;
  its loss is defined as 0 with zero gradient (pytorch-metric-learning drops
  such rows from its mean instead; weigh them out yourself if you average).

  NaN rule: a NaN or inf in q_i, or in any center c_j it is compared with
  (j != e_i), makes L_i NaN, also when it has no positive, and so any mean
  over it; gradients then are NaN too. Rows that do not see the bad value
  are unaffected (a bad query only its own row).

  Differentiable in `queries`, `centers`, `sigma` and `center_log_weights` through
  a custom VJP (reverse mode only: `jax.jvp`/`jacfwd` are not supported).
  jit/vmap-safe.

  Args:
    queries: (B, d) float embeddings f(x_i), eq. (1).
    query_labels: (B,) int labels l_i.
    centers: (M, d) float impostors c_j (same dtype family as queries).
    center_labels: (M,) int labels l_j; negative marks an absent row.
    sigma: scalar kernel width > 0 of eq. (2) (Python float or traced scalar).
    exclude: optional (B,) int: index in [0, M) of a center each query
      bypasses (its own impostor, the j != i of eq. 4); negative = none.
    chunk_size: optional int; stream over M in blocks of this many centers
      (online log-sum-exp, forward and backward), so memory is
      O(B * chunk_size) besides the (M, d) inputs and gradient. Same values
      up to float32 summation order.
    center_log_weights: optional (M,) float u_j, weights w_j = exp(u_j).

  Returns:
    (B,) float losses, in the promoted float dtype (at least float32).

  Raises:
    TypeError/ValueError: wrong ranks, dtypes, mismatched sizes, sigma <= 0
      (when concrete), `exclude` >= M (when concrete).
  """
  q, ql, c, cl, sigma, ex = check_args(queries, query_labels, centers, center_labels,
                                       sigma, exclude)
  chunk = _checks.chunk_size_arg(chunk_size, c.shape[0])
  return _nca(q, ql, c, cl, sigma, ex, log_weights_arg(center_log_weights, c), chunk)


def log_weights_arg(log_weights: Optional[Any], centers: jax.Array) -> Optional[jax.Array]:
  """Checked (M,) per-center log-weights in the centers' dtype, or None."""
  if log_weights is None:
    return None
  u = _checks.float_array(log_weights, "center_log_weights", 1)
  _checks.same_size(u, "center_log_weights", 0, centers, "centers", 0)
  return u.astype(centers.dtype)


def check_args(queries: Any, query_labels: Any, centers: Any, center_labels: Any,
               sigma: Any, exclude: Optional[Any]):
  """The NCA losses' shared arguments, checked and cast (also for `knn_nca_loss`).

  Returns:
    (q, ql, c, cl, sigma, ex): q and c in the compute dtype (at least float32),
    int32 labels, sigma as a scalar of that dtype, ex (B,) int32 (-1 = none).
  """
  q = _checks.float_array(queries, "queries", 2)
  c = _checks.float_array(centers, "centers", 2)
  ql = _checks.int_array(query_labels, "query_labels", 1)
  cl = _checks.int_array(center_labels, "center_labels", 1)
  _checks.same_size(q, "queries", 1, c, "centers", 1)
  _checks.same_size(ql, "query_labels", 0, q, "queries", 0)
  _checks.same_size(cl, "center_labels", 0, c, "centers", 0)
  _checks.positive_scalar(sigma, "sigma")
  if c.shape[0] == 0:
    raise ValueError("`centers` is empty (M = 0); the NCA loss needs >= 1 center.")
  if exclude is None:
    ex = jnp.full((q.shape[0],), -1, jnp.int32)
  else:
    ex = _checks.int_array(exclude, "exclude", 1)
    _checks.same_size(ex, "exclude", 0, q, "queries", 0)
    _checks.in_range(ex, "exclude", -(2**31), c.shape[0],
                     "center indices; negative means exclude nothing")
  dtype = _checks.compute_dtype(q.dtype, c.dtype)
  return q.astype(dtype), ql, c.astype(dtype), cl, jnp.asarray(sigma, dtype), ex
