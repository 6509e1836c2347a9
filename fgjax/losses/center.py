"""Center-style pull losses: the loose-impostor attachment term and the center loss.

* `attachment_loss`: lambda-free part of eq. (6) of Lebedev et al. (Impostor
  Networks), ||f(x_i) - c_i||^2, tying each training embedding to its own impostor.
* `center_loss`: Wen et al., "A Discriminative Feature Learning Approach for Deep
  Face Recognition" (ECCV 2016), eq. (2): 0.5 ||f_i - c_{y_i}||^2.

Both return per-example values so callers choose the reduction and weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgjax.losses import _checks


def attachment_loss(embeddings: jax.Array, impostors: jax.Array) -> jax.Array:
  """Loose-impostor attachment, eq. (6): ||f(x_i) - c_i||^2 per example.

  The caller gathers each example's own impostor, c_i = centers[index_i].
  Differentiable w.r.t. both arguments (both move in the loose scheme).

  Args:
    embeddings: (B, d) float f(x_i).
    impostors: (B, d) float c_i.

  Returns:
    (B,) float squared distances (no 1/2, no lambda).
  """
  embeddings = _checks.float_array(embeddings, "embeddings", 2)
  impostors = _checks.float_array(impostors, "impostors", 2)
  if embeddings.shape != impostors.shape:
    raise ValueError("`embeddings` and `impostors` must have the same shape (B, d); "
                     f"got {tuple(embeddings.shape)} and {tuple(impostors.shape)}. "
                     "Gather the own impostors first: centers[index].")
  return jnp.sum(jnp.square(embeddings - impostors), axis=-1)


def center_loss(features: jax.Array, labels: jax.Array,
                centers: jax.Array) -> jax.Array:
  """Center loss of Wen et al. 2016, eq. (2): 0.5 ||f_i - c_{y_i}||^2 per example.

  Args:
    features: (B, d) float.
    labels: (B,) int in [0, C).
    centers: (C, d) float class centers (gradient flows to them too; wrap in
      `jax.lax.stop_gradient` for Wen et al.'s separate center update).

  Returns:
    (B,) float.
  """
  features = _checks.float_array(features, "features", 2)
  centers = _checks.float_array(centers, "centers", 2)
  _checks.same_dim(features, "features", centers, "centers")
  labels = _checks.int_array(labels, "labels", (features.shape[0],))
  _checks.labels_in_range(labels, "labels", centers.shape[0])
  own = jnp.take(centers, labels, axis=0)
  return 0.5 * jnp.sum(jnp.square(features - own), axis=-1)
