"""k-means over the m subspaces of a product quantizer, vmapped (Jegou et al. 2011).

Each subspace gets its own codebook: `train_codebooks` seeds it (k-means++ or K random
points) and runs Lloyd steps; `assign` finds every point's nearest centroid in every
subspace at once, a few subspaces at a time when the distance block would be large.
"""

import functools

import jax
import jax.numpy as jnp

# Bound on the (subspaces x points x centroids) float32 distance block that one
# step of the batched assignment materialises; larger problems are processed
# a few subspaces at a time with lax.map(batch_size=...).
_ASSIGN_BUDGET_BYTES = 256 * 2**20


def split(x: jax.Array, m: int) -> jax.Array:
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


def subspace_batch(m: int, n: int, k: int) -> int:
  return int(max(1, min(m, _ASSIGN_BUDGET_BYTES // max(1, 4 * n * k))))


def assign(x_sub: jax.Array, centers: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """Batched `_assign_one` over subspaces: (m, N, s), (m, K, s) -> (m, N)."""
  m, n, _ = x_sub.shape
  batch = subspace_batch(m, n, centers.shape[1])
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


def lloyd(x_sub: jax.Array, centers: jax.Array, iterations: int) -> jax.Array:
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
    idx, err = assign(x_sub, c)
    return jax.vmap(update_one)(x_sub, c, idx, err)

  return jax.lax.fori_loop(0, iterations, body, centers)


@functools.partial(jax.jit, static_argnames=("m", "k", "iterations", "init"))
def train_codebooks(x_rot: jax.Array, key: jax.Array, *, m: int, k: int,
                    iterations: int, init: str) -> jax.Array:
  x_sub = split(x_rot, m)
  keys = jax.random.split(key, m)
  init_fn = _kmeans_pp_one if init == "kmeans++" else _random_init_one
  centers = jax.vmap(lambda kk, xx: init_fn(kk, xx, k))(keys, x_sub)
  return lloyd(x_sub, centers, iterations)


@functools.partial(jax.jit, static_argnames=("iterations",))
def refine_codebooks(x_rot: jax.Array, codebooks: jax.Array, *,
                     iterations: int) -> jax.Array:
  return lloyd(split(x_rot, codebooks.shape[0]), codebooks, iterations)
