"""ELoPE embedding loss: online class means, within-class and between-class terms.

Simon et al., "ELoPE: Fine-Grained Visual Classification with Efficient
Localization, Pooling and Embedding" (WACV 2020), Sec. 4, eq. (5)-(10):

  mu_c^t = mu_c^{t-1} - alpha * sum_n d(c_n, c) (mu_c^{t-1} - f_n) / (1 + N_c)   (6-8)
  L_w = 1/(2N) sum_n ||f_n - mu_{c_n}^t||^2                                       (9)
  L_b = gamma/(4|P|) sum_{(k,c) in P} max(m - ||mu_k^t - mu_c^t||^2, 0)^2         (10)
  L_e = L_w + L_b                                                                 (5)

The updated means depend on the batch features and gradients flow through them
(the "functional dependence" the paper points out), so nothing is stop-gradiented
inside the loss. ELoPE uses l2-normalised features; these functions do NOT
normalise: the caller passes normalised features (e.g. `f / ||f||`), which keeps
the functions usable for unnormalised embeddings too.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.losses import _checks
from fgjax.losses.nca import squared_distances


def update_class_means(means: jax.Array, features: jax.Array, labels: jax.Array,
                       alpha: Any, weights: Optional[jax.Array] = None) -> jax.Array:
  """ELoPE eq. (6)-(8): one online step of the class means.

  mu_c <- mu_c - alpha * (N_c mu_c - sum_{n: c_n = c} f_n) / (1 + N_c), with N_c
  the count of class c in the batch (repeated labels accumulate via segment_sum;
  classes absent from the batch are unchanged). Differentiable w.r.t. `features`
  (and `means`); no stop_gradient.

  With `weights` w, N_c = sum_{n: c_n = c} w_n and the feature sum is
  sum_{n: c_n = c} w_n f_n: a row with w_n = 0 (batch padding) changes nothing.

  Args:
    means: (C, d) float class means mu^{t-1}.
    features: (N, d) float (l2-normalised by the caller for ELoPE).
    labels: (N,) int in [0, C) (also for zero-weight rows).
    alpha: scalar float, the mean learning rate (0 keeps the means).
    weights: optional (N,) float or bool per-example weights >= 0; None: all 1.

  Returns:
    (C, d) float updated means mu^t.
  """
  means = _checks.float_array(means, "means", 2)
  features = _checks.float_array(features, "features", 2)
  _checks.same_dim(features, "features", means, "means")
  labels = _checks.int_array(labels, "labels", (features.shape[0],))
  num_classes = means.shape[0]
  _checks.labels_in_range(labels, "labels", num_classes)
  _checks.nonnegative_number(alpha, "alpha")
  w = _weights_arg(weights, features.shape[0], means.dtype)
  counts = jax.ops.segment_sum(w, labels, num_segments=num_classes)
  feat_sums = jax.ops.segment_sum(features.astype(means.dtype) * w[:, None], labels,
                                  num_segments=num_classes)
  delta = (counts[:, None] * means - feat_sums) / (1.0 + counts[:, None])
  return means - alpha * delta


def elope_loss(features: jax.Array, labels: jax.Array, means: jax.Array,
               alpha: Any, gamma: Any, margin: Any,
               weights: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """ELoPE embedding loss L_e = L_w + L_b, eq. (5), (9), (10), and the new means.

  P is the set of unordered pairs of distinct classes present in the batch
  (|P| = K(K-1)/2 for K classes present). A batch with one class has L_b = 0.

  With `weights` w, the 1/N of eq. (9) becomes the weighted mean
  sum_n w_n ||f_n - mu_{c_n}^t||^2 / (2 sum_n w_n), the means update is weighted
  (`update_class_means`) and a class is present only through rows with w_n > 0;
  so rows with w_n = 0 (batch padding) change neither the loss nor the means.

  Args:
    features: (N, d) float, l2-normalised by the caller (ELoPE Sec. 4.1).
    labels: (N,) int in [0, C).
    means: (C, d) float class means from the previous step (state).
    alpha: mean update rate of eq. (6).
    gamma: weight of the between-class term.
    margin: m of eq. (10), on squared distances.
    weights: optional (N,) float or bool per-example weights >= 0; None: all 1.

  Returns:
    (loss, new_means): loss a float scalar, differentiable w.r.t. `features`
    (through the updated means, too) and `means`; new_means (C, d) the updated
    means mu^t with `stop_gradient` applied: they are state for the next step,
    which the caller stores (e.g. as aux output of `value_and_grad`).
  """
  new_means = update_class_means(means, features, labels, alpha, weights)
  _checks.nonnegative_number(gamma, "gamma")
  _checks.nonnegative_number(margin, "margin")
  labels = jnp.asarray(labels, jnp.int32)
  n = features.shape[0]
  w = _weights_arg(weights, n, new_means.dtype)
  own = jnp.take(new_means, labels, axis=0)
  total = jnp.sum(w)
  # Safe denominator: an all-zero-weight batch gives L_w = 0, not nan.
  l_w = jnp.sum(w * jnp.sum(jnp.square(features - own), axis=-1)) / (
      2.0 * jnp.where(total > 0, total, 1.0))

  # One representative per class present: the first example with that label (among
  # rows of positive weight; zero-weight rows make no class present).
  active = w > 0
  same = (labels[:, None] == labels[None, :]) & active[None, :]
  earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
  first = active & ~jnp.any(same & earlier, axis=1)
  pairs = first[:, None] & first[None, :] & jnp.triu(jnp.ones((n, n), bool), k=1)
  num_pairs = jnp.sum(pairs)
  d2 = squared_distances(own, own)
  hinge = jnp.square(jnp.maximum(margin - d2, 0.0))
  l_b = gamma * jnp.sum(jnp.where(pairs, hinge, 0.0)) / (
      4.0 * jnp.maximum(num_pairs, 1))
  return l_w + l_b, jax.lax.stop_gradient(new_means)


def _weights_arg(weights: Optional[jax.Array], n: int, dtype) -> jax.Array:
  """Per-example weights as a (n,) float array; None -> ones."""
  if weights is None:
    return jnp.ones((n,), dtype)
  if isinstance(weights, (list, tuple)):
    weights = np.asarray(weights)
  if not hasattr(weights, "shape") or tuple(weights.shape) != (n,):
    raise ValueError(f"`weights` must have shape ({n},) like the labels; got "
                     f"{getattr(weights, 'shape', type(weights).__name__)}.")
  if _checks.is_concrete(weights) and n and float(np.min(np.asarray(weights))) < 0:
    raise ValueError("`weights` must be >= 0 (0 drops a row, e.g. batch padding); got "
                     f"min {float(np.min(np.asarray(weights)))}.")
  return jnp.asarray(weights).astype(dtype)
