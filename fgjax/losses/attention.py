"""Attention center loss: part features pulled to per-class part centers.

Coarse2Fine (Eshratifar et al., "Attention Learning", eq. 2-3) after WS-DAN (Hu & Qi
2019, eq. 9; official code GuYuc/WS-DAN.PyTorch and the TF WS_DAN): every class y has
a center c_y (M, C), one row per attention map; the part features f (M, C) of an image
of class y are pulled to it and the centers move towards the features.

  L_i = sum_{m, c} (f_i[m, c] - r_{y_i}[m, c])^2                       (eq. 2 per image)
  c_y <- c_y + beta * sum_{i: y_i = y} w_i (f_i - r_y)                  (eq. 3, summed)

r is the reference the features are compared with: the centers themselves, or (WS-DAN's
`F.normalize(feature_center[y])`) the centers l2-normalised over all M*C entries, which
the caller computes. Eq. 3 is written for one image; with several images of a class in
a batch their updates are summed, as TF's scatter_sub does (never last-write-wins):
beta * (f - r) per image. Like WS-DAN, the loss holds the centers constant (the caller
stop-gradients them) and the update sees the features without gradient.

Both functions return plain arrays; the caller reduces and weights (fgjax.objectives
term 'attention_center': the mean of L_i over valid rows, which is WS-DAN.PyTorch's
MSELoss(reduction='sum') / batch size).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from fgjax.losses import _checks
from fgjax.losses.elope import _weights_arg


def _check(part_features: jax.Array, labels: jax.Array, centers: jax.Array):
  part_features = _checks.float_array(part_features, "part_features", 3)
  centers = _checks.float_array(centers, "centers", 3)
  if part_features.shape[1:] != centers.shape[1:]:
    raise ValueError(f"`part_features` (B, M, C) and `centers` (K, M, C) disagree: "
                     f"{tuple(part_features.shape)} vs {tuple(centers.shape)}.")
  labels = _checks.int_array(labels, "labels", (part_features.shape[0],))
  _checks.labels_in_range(labels, "labels", centers.shape[0])
  return part_features, labels, centers


def attention_center_loss(part_features: jax.Array, labels: jax.Array,
                          reference: jax.Array) -> jax.Array:
  """Eq. (2) per image: sum over maps and channels of (f_i - r_{y_i})^2.

  Args:
    part_features: (B, M, C) float f (the BAP network's 'part_features').
    labels: (B,) int in [0, K).
    reference: (K, M, C) float r (centers, possibly normalised; gradient flows to them
      unless the caller stops it).

  Returns:
    (B,) float.
  """
  part_features, labels, reference = _check(part_features, labels, reference)
  own = jnp.take(reference, labels, axis=0)
  return jnp.sum(jnp.square(part_features - own), axis=(1, 2))


def update_attention_centers(centers: jax.Array, part_features: jax.Array,
                             labels: jax.Array, beta: Any,
                             weights: Optional[jax.Array] = None,
                             reference: Optional[jax.Array] = None) -> jax.Array:
  """Eq. (3), summed over a class's images: c_y + beta * sum_{i: y_i = y} w_i (f_i - r_y).

  Args:
    centers: (K, M, C) float c (state; zeros at the start, as in the paper).
    part_features: (B, M, C) float f.
    labels: (B,) int in [0, K) (also for zero-weight rows).
    beta: the update rate (WS-DAN: 5e-2); 0 keeps the centers.
    weights: optional (B,) per-row weights >= 0 (0 = batch padding); None: all 1.
    reference: (K, M, C) r of the loss; None: the centers.

  Returns:
    (K, M, C) the updated centers; classes absent from the batch are unchanged.
  """
  part_features, labels, centers = _check(part_features, labels, centers)
  _checks.nonnegative_number(beta, "beta")
  reference = centers if reference is None else reference
  w = _weights_arg(weights, part_features.shape[0], centers.dtype)
  diff = part_features.astype(centers.dtype) - jnp.take(reference, labels, axis=0)
  step = jax.ops.segment_sum(diff * w[:, None, None], labels,
                             num_segments=centers.shape[0])
  return centers + beta * step
