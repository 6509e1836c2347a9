"""Training product quantizers: plain PQ (Jegou et al. 2011) and OPQ (Ge et al. 2013)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fgjax.quantize import kmeans
from fgjax.quantize.codes import (INIT_METHODS, MAX_CENTROIDS, OPQ_INIT_ROTATIONS,
                                  ProductQuantizer, check_int, check_matrix,
                                  decode_rotated, encode_unchecked)


def _check_training_args(x: Any, num_subspaces: Any, num_centroids: Any,
                         iterations: Any, seed: Any, init: str
                         ) -> tuple[jax.Array, int, int, int, int]:
  x = check_matrix(x, "x")
  m = check_int(num_subspaces, "num_subspaces", 1)
  k = check_int(num_centroids, "num_centroids", 1)
  iterations = check_int(iterations, "iterations", 0)
  seed = check_int(seed, "seed", 0)
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
  codebooks = kmeans.train_codebooks(x, jax.random.PRNGKey(seed), m=m, k=k,
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
  opq_iterations = check_int(opq_iterations, "opq_iterations", 0)
  inner_iterations = check_int(inner_iterations, "inner_iterations", 1)
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
  codebooks = kmeans.train_codebooks(x @ rotation, key_cb, m=m, k=k,
                                     iterations=iterations, init=init)
  for _ in range(opq_iterations):
    pq = ProductQuantizer(codebooks, rotation)
    y_rot = decode_rotated(codebooks, encode_unchecked(pq, x))
    rotation = _procrustes(x, y_rot)
    codebooks = kmeans.refine_codebooks(x @ rotation, codebooks,
                                        iterations=inner_iterations)
  if opq_iterations:
    codebooks = kmeans.refine_codebooks(x @ rotation, codebooks,
                                        iterations=iterations)
  return ProductQuantizer(codebooks, rotation)
