"""ELoPE's localization: heat maps -> boxes -> crops, batched with fixed shapes.

Hanselmann & Ney, "ELoPE: Fine-Grained Visual Classification with Efficient
Localization, Pooling and Embedding" (WACV 2020), section 5: the channel mean of a
trained classifier's last conv map is a heat map of the object; the box is the
smallest rectangle holding every cell of the min-max normalised heat map above a
threshold tau (Table 2: 0.3 on birds, 0.2 otherwise), mapped to input coordinates; the
image is cropped to it and classified.

Everything here is a pure, jit-able function of arrays with fixed output shapes, so it
runs inside the jitted forward for a whole batch: no per-image Python on the hot path.
Boxes are normalised (ymin, xmin, ymax, xmax) in [0, 1], the TFDS BBox convention.
"""

from typing import Sequence

import jax
import jax.numpy as jnp


def channel_mean_heatmap(feature_map: jax.Array) -> jax.Array:
  """ELoPE section 5 / Fig. 2: the mean over the D feature maps, (N, I, J, D) -> (N, I, J)."""
  return jnp.mean(feature_map, axis=-1)


def heatmap_boxes(heatmap: jax.Array, tau: float) -> jax.Array:
  """Boxes of ELoPE section 5 from (N, I, J) heat maps: (N, 4) normalised boxes.

  Each map is min-max normalised to [0, 1]; cell (i, j) is on when its value is greater
  than `tau`; the box is the smallest rectangle of cells holding every on cell, in
  input coordinates: cell (i, j) covers [i/I, (i+1)/I) x [j/J, (j+1)/J). A constant
  map has no cell above any tau in [0, 1) after normalisation (it normalises to 0):
  its box is the whole image (0, 0, 1, 1). The maximal cell normalises to 1, so any
  other map with tau < 1 has at least one on cell (a one-cell map gives that cell).

  Args:
    heatmap: (N, I, J) float.
    tau: threshold in [0, 1).
  """
  if heatmap.ndim != 3:
    raise ValueError(f"heatmap must be (N, I, J), got shape {tuple(heatmap.shape)}.")
  if not 0.0 <= float(tau) < 1.0:
    raise ValueError(f"tau={tau} must lie in [0, 1) (ELoPE Table 2: 0.3 / 0.2).")
  n, rows, cols = heatmap.shape
  lo = jnp.min(heatmap, axis=(1, 2), keepdims=True)
  span = jnp.max(heatmap, axis=(1, 2), keepdims=True) - lo
  norm = jnp.where(span > 0, (heatmap - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  # max of a 0/1 mask rather than jnp.any: ONNX has ReduceMax but no reduce_or.
  on = (norm > tau).astype(jnp.float32)
  row_on, col_on = jnp.max(on, axis=2) > 0, jnp.max(on, axis=1) > 0  # (N, I), (N, J)

  def extent(mask, size):
    idx = jnp.arange(size)
    first = jnp.min(jnp.where(mask, idx, size), axis=1)
    last = jnp.max(jnp.where(mask, idx, -1), axis=1)
    return first / size, (last + 1) / size

  y0, y1 = extent(row_on, rows)
  x0, x1 = extent(col_on, cols)
  boxes = jnp.stack([y0, x0, y1, x1], axis=1).astype(jnp.float32)
  empty = jnp.max(row_on.astype(jnp.float32), axis=1) == 0
  return jnp.where(empty[:, None], jnp.asarray([0.0, 0.0, 1.0, 1.0]), boxes)


def crop_and_resize(images: jax.Array, boxes: jax.Array,
                    size: Sequence[int]) -> jax.Array:
  """Each image cropped to its box and resized to `size` (bilinear, antialiased).

  Args:
    images: (N, H, W, C) float.
    boxes: (N, 4) normalised (ymin, xmin, ymax, xmax), ymax > ymin, xmax > xmin.
    size: (h, w) of the output.

  Returns:
    (N, h, w, C): pixel (r, c) of crop n samples image n at
    (ymin * H + (r + 0.5) * box_h / h, xmin * W + (c + 0.5) * box_w / w) (pixel centres),
    via jax.image.scale_and_translate: one compiled op for the batch.
  """
  if images.ndim != 4 or boxes.shape != (images.shape[0], 4):
    raise ValueError(f"images must be (N, H, W, C) and boxes (N, 4); got "
                     f"{tuple(images.shape)} and {tuple(boxes.shape)}.")
  h_in, w_in = images.shape[1:3]
  h, w = int(size[0]), int(size[1])
  box_h = jnp.maximum((boxes[:, 2] - boxes[:, 0]) * h_in, 1e-3)
  box_w = jnp.maximum((boxes[:, 3] - boxes[:, 1]) * w_in, 1e-3)
  scale = jnp.stack([h / box_h, w / box_w], axis=1)
  translation = -jnp.stack([boxes[:, 0] * h_in, boxes[:, 1] * w_in], axis=1) * scale

  def one(image, s, t):
    return jax.image.scale_and_translate(image, (h, w, image.shape[-1]), (0, 1), s, t,
                                         method="linear", antialias=True)

  return jax.vmap(one)(images, scale.astype(images.dtype),
                       translation.astype(images.dtype))


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Intersection over union of matching rows of (N, 4) boxes (ymin, xmin, ymax, xmax)."""
  inter_h = jnp.clip(jnp.minimum(a[:, 2], b[:, 2]) - jnp.maximum(a[:, 0], b[:, 0]), 0)
  inter_w = jnp.clip(jnp.minimum(a[:, 3], b[:, 3]) - jnp.maximum(a[:, 1], b[:, 1]), 0)
  inter = inter_h * inter_w
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def localization_accuracy(predicted: jax.Array, truth: jax.Array,
                          threshold: float = 0.5) -> float:
  """ELoPE Table 4: the fraction of images whose box has IoU >= `threshold`."""
  return float(jnp.mean(box_iou(predicted, truth) >= threshold))
