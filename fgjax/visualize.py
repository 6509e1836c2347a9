"""Pictures people look at: heat maps over images, with predicted and true boxes,
attention maps, reliability diagrams, and a sweep's val accuracy against the learning
rate.

Needs matplotlib (the optional 'plots' extra, in the test extras); callers that must not
fail for a picture catch ImportError.
"""

import math
import os
from typing import Optional, Sequence

import numpy as np


def to_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised NHWC images back to 0..255 uint8 pixels: x * std + mean."""
  pixels = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(
      mean, np.float32)
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def heatmap_grid(path: str, images: np.ndarray, heatmaps: np.ndarray,
                 boxes: Optional[np.ndarray] = None, truth: Optional[np.ndarray] = None,
                 titles: Optional[Sequence[str]] = None, columns: int = 4) -> str:
  """Writes a PNG grid: each image with its min-max normalised heat map overlaid (jet,
  half transparent), the predicted box (yellow, solid) and the true box (cyan, dashed).

  Args:
    path: the PNG to write.
    images: (N, H, W, 3) uint8.
    heatmaps: (N, I, J), any scale (each is min-max normalised for display).
    boxes, truth: optional (N, 4) normalised (ymin, xmin, ymax, xmax); rows of NaN in
      `truth` are images without a known box.
    titles: optional N captions.
  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import patches  # pylint: disable=g-import-not-at-top

  n = len(images)
  if n == 0:
    raise ValueError("heatmap_grid needs at least one image.")
  cols = min(columns, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for k in range(n):
    ax = axes.ravel()[k]
    h, w = images[k].shape[:2]
    heat = np.asarray(heatmaps[k], np.float64)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    ax.imshow(images[k])
    ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
    for box, style in ((None if boxes is None else boxes[k], dict(ec="yellow", ls="-")),
                       (None if truth is None else truth[k], dict(ec="cyan", ls="--"))):
      if box is None or not np.all(np.isfinite(box)):
        continue
      y0, x0, y1, x1 = np.asarray(box, np.float64) * [h, w, h, w]
      ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2,
                                     **style))
    if titles is not None:
      ax.set_title(str(titles[k])[:40], fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def attention_grid(path: str, images: np.ndarray, attention: np.ndarray,
                   titles: Optional[Sequence[str]] = None, max_maps: int = 8) -> str:
  """Writes a PNG grid of attention maps (WS-DAN / Coarse2Fine Fig. 6): one row per
  image, its mean map first, then the first `max_maps` maps, each min-max normalised
  and overlaid on the image (jet, half transparent).

  Args:
    path: the PNG to write.
    images: (N, H, W, 3) uint8.
    attention: (N, I, J, M) attention maps (any scale).
    titles: optional N captions (on the mean map).
  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  attention = np.asarray(attention, np.float64)
  if len(images) == 0 or attention.ndim != 4 or len(attention) != len(images):
    raise ValueError(f"attention_grid needs N >= 1 images and (N, I, J, M) maps; got "
                     f"{len(images)} images and maps of shape {attention.shape}.")
  maps = min(max_maps, attention.shape[-1])
  n, cols = len(images), maps + 1
  fig, axes = plt.subplots(n, cols, figsize=(2 * cols, 2.1 * n), squeeze=False)
  for k in range(n):
    h, w = images[k].shape[:2]
    panels = [attention[k].mean(-1)] + [attention[k, ..., m] for m in range(maps)]
    for j, heat in enumerate(panels):
      ax = axes[k, j]
      ax.axis("off")
      span = heat.max() - heat.min()
      heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
      ax.imshow(images[k])
      ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, w, h, 0),
                interpolation="bilinear")
      label = "mean" if j == 0 else f"map {j - 1}"
      if j == 0 and titles is not None:
        label = f"{str(titles[k])[:24]}: mean"
      ax.set_title(label, fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def reliability_diagram(path: str, reports: dict[str, dict], title: str = "") -> str:
  """Writes a PNG reliability diagram: per classifier, accuracy against confidence of
  its non-empty bins (fgjax.calibration.reliability), the diagonal of perfect
  calibration, and the ECE in the legend.

  Args:
    path: the PNG to write.
    reports: {label: calibration.reliability(...) result}, e.g. {'rbf': ...}.
    title: the figure title.
  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.8, 4.6))
  ax.plot([0, 1], [0, 1], ":", c="gray", label="perfect calibration")
  for label, report in reports.items():
    bins = [b for b in report["bins"] if b["count"]]
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
            ms=4, label=f"{label}: ECE {report['ece']:.3f}, NLL {report['nll']:.2f}")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence (top-class probability)")
  ax.set_ylabel("accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def lr_curves(path: str, sweep: dict[str, list[dict]], labels: dict[str, str],
              chosen: dict[str, float], title: str = "") -> str:
  """Writes a PNG of val top-1 against the learning rate (log axis), one line per row
  of a sweep, each row's chosen rate ringed: a choice at its grid's edge, or a flat
  curve, shows at a glance. Where a row tried several settings at one rate (e.g.
  sigma), the line follows the best of them. A rate whose runs all diverged (val_top1
  None) is an x on the plot's floor.

  Args:
    path: the PNG to write.
    sweep: {row: [{'lr': float, 'val_top1': float or None, ...}, ...]}, any order.
    labels: {row: legend label}.
    chosen: {row: the rate chosen on val}.
    title: the figure title.
  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  failed = []
  for name, rows in sweep.items():
    best_at: dict[float, float] = {}
    for r in rows:
      if r["val_top1"] is not None:
        best_at[r["lr"]] = max(best_at.get(r["lr"], -1.0), r["val_top1"])
    pts = sorted(best_at.items())
    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4,
                    label=labels.get(name, name))
    best = [v for lr, v in pts if lr == chosen.get(name)]
    if best:
      ax.plot([chosen[name]], best[:1], "o", ms=11, mfc="none", c=line.get_color())
    failed.append((sorted({r["lr"] for r in rows} - set(best_at)), line.get_color()))
  floor = ax.get_ylim()[0]
  for lrs, color in failed:
    if lrs:
      ax.plot(lrs, [floor] * len(lrs), "x", ms=9, mew=2, c=color, clip_on=False)
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("val top-1")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
