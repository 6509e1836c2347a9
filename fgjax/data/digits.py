"""The `digits` source: scikit-learn's 8x8 handwritten digits, held in memory.

A small real data set for smoke runs and tests. 'canonical' is the stratified
'train:0.6,val:0.2,test:0.2' split with config.data.seed; any per-class counts or
fractions work too, as do classes_subset and holdout_classes (splits.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fgjax.data import records
from fgjax.data import registry
from fgjax.data import splits

DIGITS_CANONICAL = "train:0.6,val:0.2,test:0.2"


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's load_digits: uint8 (1797, 8, 8, 3) in 0..255 and labels (1797,).

  Pixel values 0..16 are scaled by 255 / 16 and rounded; the channel is replicated.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  gray = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int32)


@registry.register("digits")
def digits_source(cfg: Any) -> splits.Splits:
  """Digits with a stratified split ('canonical' = DIGITS_CANONICAL)."""
  spec = cfg.get("split", "canonical")
  kind, values = splits.parse_split(DIGITS_CANONICAL if spec == "canonical" else spec)
  images, labels = digits_images()
  class_names = [str(d) for d in range(10)]
  positions = splits.stratified_split(labels, kind, values, splits.config_seed(cfg),
                                      class_names)

  def make(split: str, pos: np.ndarray, new_labels: np.ndarray) -> records.ArraySource:
    return records.ArraySource(images[pos], new_labels, name=f"digits:{split}")

  return splits.make_splits(cfg, {s: (p, labels[p]) for s, p in positions.items()},
                            class_names, make, "digits")
