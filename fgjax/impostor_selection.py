"""Which impostors to keep, drop or add, and the label redistribution of eq. (13).

An impostor network stores one impostor per training image (Lebedev et al., "Impostor
Networks for Fast Fine-Grained Recognition", section 3); memory grows with M. The NNGK
review (Chervontsev, "Deep Metric Learning and Image Classification with Nearest
Neighbour Gaussian Kernels", section 4.2) proposes to "drop some of the centers once we
see their labels are well predicted by their neighbourhood" and to add hard samples as
centers, redistributing the labels of the neighbours of a dropped or added center
z_0 by its eq. (13):

    Delta y_j = k(z_j, z_0) / sum_{i in N_k(z_j)} k(z_j, z_i) * (y_0 - y_j),

k the Gaussian kernel (impostor paper eq. 2). Here:

  leave_one_out_posterior  p_{-i}(l_i | c_i): the RBF rule (impostor paper eq. 3) over
                           the other impostors, evaluated at each impostor, of its own
                           label (hard labels; chunked, M = 100k fits in memory).
  soft_leave_one_out_posterior  the same for soft labels: sum_l Y_i[l] p_{-i}(l | c_i).
  keep_random              a uniformly random subset of a given fraction.
  keep_random_per_class    the same within each class, at least one per class.
  drop_best_predicted      the review's rule: drop the impostors whose own label is
                           predicted best, never a class's last impostor.
  add_worst_predicted      the candidates whose label is predicted worst.
  redistribute_labels      eq. (13) around one center; drop_with_redistribution /
                           add_with_redistribution apply it to a sequence of drops /
                           adds, one after the other (Algorithm 1's loops).

Selections are NumPy index arrays; ties are broken by the lower index (so every
selection is deterministic given its inputs).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import impostors as impostors_lib
from fgjax.losses import soft_nca


# The soft RBF rule, compiled once per shape (also fgjax.continual's test-time rule).
soft_rule = jax.jit(soft_nca.soft_rbf_log_probs)


@functools.partial(jax.jit, static_argnames=("num_classes", "chunk_size"))
def _own_label_log_probs(queries, rows, impostors, sigma, num_classes, chunk_size):
  lp = impostors_lib.rbf_log_probs(queries, impostors, sigma, num_classes,
                                   exclude=rows, chunk_size=chunk_size)
  own = jnp.take(impostors.labels, jnp.maximum(rows, 0))
  return jnp.take_along_axis(lp, own[:, None], axis=1)[:, 0]


def leave_one_out_posterior(impostors: impostors_lib.ImpostorSet, sigma: float,
                            num_classes: int, query_chunk: int = 1024,
                            chunk_size: int = 8192) -> np.ndarray:
  """p_{-i}(l_i | c_i) for every impostor: eq. (3) over the others (j != i), at c_i.

  Reuses `fgjax.impostors.rbf_log_probs` (log space, own impostor excluded, streamed
  over the M impostors in blocks of `chunk_size`), over blocks of `query_chunk`
  impostors as queries: memory O(query_chunk * (chunk_size + C)), so M = 100k runs
  in bounded memory (time O(M^2 d)).

  Args:
    impostors: ImpostorSet, centers (M, d), labels (M,) in [0, num_classes).
    sigma: kernel width of eq. (2), > 0.
    num_classes: C.
    query_chunk: impostors scored per compiled call (the last block is padded).
    chunk_size: impostors per streamed block inside a call.

  Returns:
    (M,) float64 posteriors in [0, 1]; 0 for an impostor alone in its class.
  """
  centers = np.asarray(impostors.centers, np.float32)
  labels = np.asarray(impostors.labels, np.int32)
  m = len(centers)
  if m < 2:
    raise ValueError(f"leave_one_out_posterior needs >= 2 impostors, got M = {m}.")
  if query_chunk < 1 or chunk_size < 1:
    raise ValueError(f"query_chunk={query_chunk} and chunk_size={chunk_size} must be "
                     ">= 1.")
  imps = impostors_lib.ImpostorSet(jnp.asarray(centers), jnp.asarray(labels))
  block = min(query_chunk, m)
  chunk = min(chunk_size, m)
  out = np.zeros(m, np.float64)
  for start in range(0, m, block):
    rows = np.arange(start, start + block)
    valid = rows < m
    # Padding rows repeat the last impostor; their results are dropped.
    q = centers[np.minimum(rows, m - 1)]
    lp = _own_label_log_probs(jnp.asarray(q), jnp.asarray(np.where(valid, rows, -1)),
                              imps, jnp.float32(sigma), num_classes, chunk)
    out[rows[valid]] = np.exp(np.asarray(lp, np.float64))[valid]
  return out


def soft_leave_one_out_posterior(centers: Any, soft_labels: Any, sigma: float,
                                 query_chunk: int = 1024) -> np.ndarray:
  """sum_l Y_i[l] p_{-i}(l | c_i): how well each soft-labelled center's own label
  distribution is predicted by the others (soft eq. 3, fgjax.losses.soft_nca).

  With one-hot labels it equals `leave_one_out_posterior`.

  Args:
    centers: (M, d) float.
    soft_labels: (M, C) float, rows distributions.
    sigma: kernel width > 0.
    query_chunk: centers scored per call (memory O(query_chunk * M)).

  Returns:
    (M,) float64 in [0, 1].
  """
  c = jnp.asarray(centers, jnp.float32)
  y = np.asarray(soft_labels, np.float64)
  m = c.shape[0]
  if m < 2:
    raise ValueError(f"soft_leave_one_out_posterior needs >= 2 centers, got M = {m}.")
  out = np.zeros(m, np.float64)
  for start in range(0, m, query_chunk):
    rows = np.arange(start, min(start + query_chunk, m))
    lp = np.asarray(soft_rule(c[rows], c, jnp.asarray(y, jnp.float32),
                              jnp.float32(sigma), exclude=jnp.asarray(rows, jnp.int32)),
                    np.float64)
    out[rows] = np.sum(y[rows] * np.exp(lp), axis=1)
  return out


def keep_random(num_impostors: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of round(fraction * M) impostors (at least 1) drawn uniformly
  without replacement with NumPy's PCG64 from `seed`; classes may lose every
  impostor (that is the rule's cost)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction} must be in (0, 1].")
  if num_impostors < 1:
    raise ValueError(f"num_impostors={num_impostors} must be >= 1.")
  count = max(1, int(round(fraction * num_impostors)))
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_impostors, size=count, replace=False))


def keep_random_per_class(labels: Any, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a stratified random subset: in each class of n_c impostors,
  max(1, round(fraction * n_c)) drawn uniformly (PCG64 from `seed`, classes in
  label order). Keeps every class, like `drop_best_predicted`'s floor: the random
  baseline with the same class coverage."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction} must be in (0, 1].")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  kept = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    kept.append(rng.choice(members, size=count, replace=False))
  return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _order(scores: np.ndarray, descending: bool) -> np.ndarray:
  """Indices by score (descending or ascending), ties by the lower index first."""
  scores = np.asarray(scores, np.float64)
  idx = np.arange(len(scores))
  return np.lexsort((idx, -scores if descending else scores))


def drop_best_predicted(posterior: Any, labels: Any, num_drop: int) -> np.ndarray:
  """The review's rule (section 4.2): drop the impostors best predicted by the others.

  Impostors are dropped in order of decreasing `posterior` (ties: lower index first),
  skipping any that is the last one left of its class, until `num_drop` are dropped
  or only one impostor per class remains. The posteriors are computed once, before
  any drop (one-shot, not re-scored after each drop). Equivalently: in each class the
  member that comes last in the drop order is protected, and the first `num_drop`
  unprotected impostors of the order are dropped.

  Args:
    posterior: (M,) how well each impostor's own label is predicted by the others
      (`leave_one_out_posterior` or `soft_leave_one_out_posterior`).
    labels: (M,) int class of each impostor (argmax of a soft label).
    num_drop: how many to drop, >= 0.

  Returns:
    Sorted indices of the kept impostors: M - num_drop of them, or more when the
    class floor binds (then exactly one per class).
  """
  posterior = np.asarray(posterior, np.float64)
  labels = np.asarray(labels)
  if posterior.shape != labels.shape or posterior.ndim != 1:
    raise ValueError(f"posterior {posterior.shape} and labels {labels.shape} must be "
                     "(M,) arrays of one length.")
  if num_drop < 0:
    raise ValueError(f"num_drop={num_drop} must be >= 0.")
  order = _order(posterior, descending=True)
  protected = np.zeros(len(order), bool)
  # The last occurrence of each class in drop order is its protected member.
  _, last_from_end = np.unique(labels[order][::-1], return_index=True)
  protected[order[len(order) - 1 - last_from_end]] = True
  candidates = order[~protected[order]]
  keep = np.ones(len(order), bool)
  keep[candidates[:num_drop]] = False
  return np.flatnonzero(keep)


def add_worst_predicted(posterior: Any, num_add: int) -> np.ndarray:
  """Indices of the `num_add` candidates whose own label is predicted worst (lowest
  `posterior`, ties: lower index first), worst first: Algorithm 1's S_a."""
  posterior = np.asarray(posterior, np.float64)
  if posterior.ndim != 1:
    raise ValueError(f"posterior must be (N,), got shape {posterior.shape}.")
  if not 0 <= num_add <= len(posterior):
    raise ValueError(f"num_add={num_add} must be in [0, {len(posterior)}] (the number "
                     "of candidates).")
  return _order(posterior, descending=False)[:num_add]


def _sq_dists(rows: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """(len(rows), M) squared distances, float64, clamped at 0."""
  d = (np.sum(rows * rows, 1)[:, None] + np.sum(centers * centers, 1)[None, :]
       - 2.0 * rows @ centers.T)
  return np.maximum(d, 0.0)


def redistribute_labels(centers: Any, soft_labels: Any, origin: int, sigma: float,
                        k: int) -> np.ndarray:
  """NNGK review eq. (13) around center `origin` (z_0): its neighbours' new labels.

  For each of the k centers z_j nearest to z_0 (other than z_0):

      y_j <- y_j + w_j (y_0 - y_j),  w_j = k(z_j, z_0) / sum_{i in N_k(z_j)} k(z_j, z_i),

  N_k(z_j) the k centers nearest to z_j other than z_j itself, among a set holding
  z_0 (call it before removing a dropped center, after appending an added one).
  Then k(z_j, z_0) <= the largest kernel of N_k(z_j), so w_j is in [0, 1] and each
  y_j stays a distribution (a convex combination of two). The kernel sums are shifted
  by z_j's nearest distance (float64), so nothing underflows to 0/0. The k neighbours
  are updated together, from the labels as they were.

  Args:
    centers: (M, d) float, z_0 = centers[origin].
    soft_labels: (M, C) float, rows distributions.
    origin: index of z_0.
    sigma: kernel width of eq. (2), > 0.
    k: neighbourhood size >= 1 (capped at M - 1).

  Returns:
    (M, C) float64 new labels; row `origin` and rows outside N_k(z_0) unchanged.
  """
  c = np.asarray(centers, np.float64)
  y = np.array(soft_labels, np.float64)
  m = len(c)
  if y.shape[0] != m:
    raise ValueError(f"soft_labels has {y.shape[0]} rows, centers {m}.")
  if not 0 <= origin < m:
    raise ValueError(f"origin={origin} is not a center index in [0, {m}).")
  _check_kernel(sigma, k)
  _redistribute(c, y, origin, np.ones(m, bool), sigma, k)
  return y


def _check_kernel(sigma: float, k: int) -> None:
  if not sigma > 0 or k < 1:
    raise ValueError(f"sigma={sigma} must be > 0 and k={k} >= 1.")


def _redistribute(c: np.ndarray, y: np.ndarray, origin: int, alive: np.ndarray,
                  sigma: float, k: int) -> None:
  """`redistribute_labels` in place on the rows of `alive` (others are not centers)."""
  m = int(alive.sum())
  if m < 2:
    return
  k = min(k, m - 1)
  scale = 0.5 / sigma**2
  d0 = _sq_dists(c[origin:origin + 1], c)[0]
  d0[~alive] = np.inf
  d0[origin] = np.inf
  neighbours = np.lexsort((np.arange(len(c)), d0))[:k]
  d = _sq_dists(c[neighbours], c)                               # (k, M)
  d[:, ~alive] = np.inf
  d[np.arange(k), neighbours] = np.inf                          # z_j not in N_k(z_j)
  nearest = np.partition(d, k - 1, axis=1)[:, :k]               # N_k(z_j) distances
  shift = nearest.min(axis=1)
  denom = np.sum(np.exp(-scale * (nearest - shift[:, None])), axis=1)
  w = np.exp(-scale * (d[:, origin] - shift)) / denom
  y[neighbours] += w[:, None] * (y[origin][None, :] - y[neighbours])


def drop_with_redistribution(centers: Any, soft_labels: Any, drop: Any, sigma: float,
                             k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Algorithm 1's drop loop: for each index of `drop` in order, eq. (13) around it
  (`redistribute_labels` on the centers still present), then remove it.

  Returns:
    (kept indices into the input, sorted; their centers (M - n_d, d) as given;
    their soft labels (M - n_d, C) float64).
  """
  c = np.asarray(centers)
  y = np.array(soft_labels, np.float64)
  drop = np.asarray(drop, np.int64)
  if len(np.unique(drop)) != len(drop) or np.any((drop < 0) | (drop >= len(c))):
    raise ValueError(f"drop must hold distinct indices in [0, {len(c)}).")
  _check_kernel(sigma, k)
  c64 = c.astype(np.float64)
  alive = np.ones(len(c), bool)
  for index in drop:
    _redistribute(c64, y, int(index), alive, sigma, k)
    alive[index] = False
  kept = np.flatnonzero(alive)
  return kept, c[kept], y[kept]


def add_with_redistribution(centers: Any, soft_labels: Any, new_centers: Any,
                            new_labels: Any, sigma: float,
                            k: int) -> tuple[np.ndarray, np.ndarray]:
  """Algorithm 1's add loop: append each new center in order, then eq. (13) around it.

  Returns:
    (centers (M + n_a, d), soft labels (M + n_a, C) float64), new rows last.
  """
  c = np.asarray(centers)
  new_c = np.asarray(new_centers, c.dtype)
  new_y = np.asarray(new_labels, np.float64)
  if len(new_c) != len(new_y) or (len(new_c) and new_c.shape[1] != c.shape[1]):
    raise ValueError(f"new_centers {new_c.shape} and new_labels {new_y.shape} must be "
                     f"(n_a, {c.shape[1]}) and (n_a, C).")
  _check_kernel(sigma, k)
  c = np.concatenate([c, new_c])
  y = np.concatenate([np.asarray(soft_labels, np.float64), new_y])
  c64 = c.astype(np.float64)
  alive = np.zeros(len(c), bool)
  alive[:len(c) - len(new_c)] = True
  for index in range(len(c) - len(new_c), len(c)):
    alive[index] = True
    _redistribute(c64, y, index, alive, sigma, k)
  return c, y
