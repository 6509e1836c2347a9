"""What the data tests share: a data config with every field a source reads, and a
folder of small, distinct PNG images per class."""

import pathlib

import ml_collections
import numpy as np
from PIL import Image


def data_config(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({
      "source": "image_folder", "root": "", "split": "canonical", "seed": 0,
      "tfds_name": "", "tfds_data_dir": "", "bbox_crop": False,
      "holdout_classes": (), "classes_subset": ()})
  c.update(kw)
  return c


def rgb(seed: int, h: int = 12, w: int = 10) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root: pathlib.Path, num_classes: int = 3, per_class: int = 5,
                size: int = 12) -> pathlib.Path:
  for c in range(num_classes):
    d = root / f"class_{c:02d}"
    d.mkdir(parents=True)
    for n in range(1, per_class + 1):
      Image.fromarray(rgb(100 * c + n, size, size)).save(d / f"{n}.png")
  return root
