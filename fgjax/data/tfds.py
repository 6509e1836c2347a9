"""The `tfds` source: TensorFlow Datasets without TensorFlow (`tfds.data_source`).

`tfds.data_source(name, split=..., data_dir=..., download=False)` reads prepared
ArrayRecord files with NumPy decoding only, so training needs no TensorFlow. Data
must already be prepared (we never download during training): see
`TfdsDataMissingError` for the fix printed to the user.

Preparing these four data sets (`tfds build` / `download_and_prepare`) DOES need
TensorFlow: their builders (caltech_birds2011, cars196, stanford_dogs,
oxford_flowers102 in tensorflow_datasets 4.9.10) read the raw archives with
`tf.io.gfile`, which is not installed here. Prepare them once on a machine with
TensorFlow and network access:
  pip install -e '.[prepare]'     # tensorflow, next to tensorflow-datasets
  tfds build caltech_birds2011 --file_format=array_record --data_dir=/path/tfds
and pass `--config.data.tfds_data_dir=/path/tfds`. The default TFRecord format
cannot be read with random access: `--file_format=array_record` is required.

Splits: 'canonical' uses the data set's own train / validation / test; where it has
no validation split (caltech_birds2011, cars196, stanford_dogs), `data.val_fraction`
(default 0.1) of train, chosen by a permutation seeded with data.seed, becomes val.
`data.classes_subset` / `holdout_classes` then select classes as for every source
(splits.make_splits); they need every record's label, so they read each record of
the data set once when the splits are built.
Bounding boxes (`data.bbox_crop`): TFDS BBox (ymin, xmin, ymax, xmax), normalised;
the image is cropped before any resize (paper section 4, following [6]).
stanford_dogs stores a box per dog in 'objects': their union is used.

This module is `fgjax.data.tfds`; the library is always imported inside functions
as `import tensorflow_datasets as tfds` (an absolute import, so no shadowing).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from fgjax.data import registry
from fgjax.data import splits
from fgjax.data import transforms

# Native split names per data set; others fall back to train / test.
KNOWN_SPLITS = {
    "caltech_birds2011": ("train", None, "test"),
    "cars196": ("train", None, "test"),
    "stanford_dogs": ("train", None, "test"),
    "oxford_flowers102": ("train", "validation", "test"),
}


class TfdsDataMissingError(FileNotFoundError):
  """The TFDS data set is not prepared (as ArrayRecord) under the data_dir used."""


def resolve_data_dir(data_dir: str = "") -> str:
  """data.tfds_data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS rule)."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.path.abspath(os.path.expanduser(str(tfds.core.constants.DATA_DIR)))


def read_labels(data_source: Any, positions: Optional[Sequence[int]] = None) -> np.ndarray:
  """int32 labels of `positions` (default: all) of a TFDS data source (full reads)."""
  if positions is None:
    positions = range(len(data_source))
  return np.asarray([int(data_source[int(p)]["label"]) for p in positions], np.int32)


class TfdsSource:
  """Records from a TFDS data source, restricted to `positions` (default: all).

  Record: {'image': uint8 (H, W, 3), 'label': int, 'index': position in this split},
  and, for data sets with boxes read without bbox_crop, 'box': the object's normalised
  (ymin, xmin, ymax, xmax) (the union of all boxes where a record has several), for
  localization accuracy. `has_boxes` says whether records carry it.
  `labels` (given, e.g. re-indexed by a class selection, or read from the records on
  first use) is the record's label.
  """

  def __init__(self, data_source: Any, positions: Optional[np.ndarray] = None,
               labels: Optional[Sequence[int]] = None, bbox_crop: bool = False,
               name: str = ""):
    self.data_source = data_source
    self.positions = (np.arange(len(data_source)) if positions is None
                      else np.asarray(positions, np.int64))
    self.bbox_crop = bbox_crop
    self.has_boxes = not bbox_crop and _box_feature(data_source) is not None
    self.name = name
    self.bad_files: list[str] = []
    self.read_failures: list[str] = []
    self._labels = None if labels is None else np.asarray(labels, np.int32).reshape(-1)
    if self._labels is not None and len(self._labels) != len(self.positions):
      raise ValueError(f"{len(self.positions)} positions but {len(self._labels)} labels.")

  def __len__(self) -> int:
    return len(self.positions)

  @property
  def labels(self) -> np.ndarray:
    """int32 (N,); when not given, reads every record once (images too), then cached."""
    if self._labels is None:
      self._labels = read_labels(self.data_source, self.positions)
    return self._labels

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {self.name} of size {len(self)}.")
    ex = self.data_source[int(self.positions[i])]
    image = transforms.as_rgb_array(ex["image"])
    box = _record_box(ex)
    label = int(ex["label"]) if self._labels is None else int(self._labels[i])
    if self.bbox_crop:
      if box is None:
        raise ValueError(f"config.data.bbox_crop=True but {self.name} records have no "
                         "'bbox' feature; set --config.data.bbox_crop=False.")
      return {"image": transforms.crop_box(image, box), "label": label, "index": i}
    rec = {"image": image, "label": label, "index": i}
    if self.has_boxes:
      rec["box"] = box
    return rec

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, len={len(self)})"


def _record_box(ex: Any) -> Optional[np.ndarray]:
  """A record's normalised box: 'bbox', or the union of 'objects/bbox'; else None."""
  if "bbox" in ex:
    return np.asarray(ex["bbox"], np.float64).reshape(-1)[:4]
  if "objects" in ex and "bbox" in ex["objects"]:
    return transforms.union_bbox(ex["objects"]["bbox"])
  return None


def _box_feature(data_source: Any) -> Optional[str]:
  """'bbox' or 'objects' when the data set's features hold boxes, else None."""
  try:
    features = data_source.dataset_info.features
  except Exception:  # pylint: disable=broad-except
    return None
  if "bbox" in features:
    return "bbox"
  if "objects" in features and "bbox" in getattr(features["objects"], "keys", list)():
    return "objects"
  return None


def _open(name: str, split: str, data_dir: str) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.tfds_name={name!r} is not a TFDS data set ({e}).") from e
  except Exception as e:  # pylint: disable=broad-except
    raise TfdsDataMissingError(
        f"TFDS data set {name!r} (split {split!r}) is not prepared as ArrayRecord under "
        f"data_dir={data_dir} (from config.data.tfds_data_dir, $TFDS_DATA_DIR or "
        "~/tensorflow_datasets); download is off during training. Fix: pass "
        "--config.data.tfds_data_dir=/path/to/tensorflow_datasets holding a prepared "
        "copy, or prepare it once with network and TensorFlow (`pip install -e "
        f"'.[prepare]'`, then `tfds build {name} "
        f"--file_format=array_record --data_dir={data_dir}`). TFDS said: "
        f"{type(e).__name__}: {e}") from e


def _class_names(ds: Any, name: str) -> list[str]:
  try:
    return list(ds.dataset_info.features["label"].names)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"TFDS data set {name!r} has no ClassLabel 'label' feature; it cannot "
                     "be used for classification.") from e


@registry.register("tfds")
def tfds_source(cfg: Any) -> splits.Splits:
  """Splits of a prepared TFDS data set (see the module docstring)."""
  name = cfg.get("tfds_name", "")
  if not name or not isinstance(name, str):
    raise ValueError("config.data.tfds_name must name a TFDS data set for source='tfds', "
                     "e.g. 'caltech_birds2011'.")
  split = cfg.get("split", "canonical")
  if split != "canonical":
    raise ValueError(f"config.data.split={split!r}: source='tfds' supports only "
                     "'canonical' (the data set's own splits, val carved from train "
                     "when missing).")
  val_fraction = float(cfg.get("val_fraction", 0.1))
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"config.data.val_fraction must lie in (0, 1), got {val_fraction}.")
  seed = splits.config_seed(cfg)
  bbox_crop = bool(cfg.get("bbox_crop", False))
  data_dir = resolve_data_dir(cfg.get("tfds_data_dir", ""))
  train_name, val_name, test_name = KNOWN_SPLITS.get(name, ("train", None, "test"))

  train_ds = _open(name, train_name, data_dir)
  test_ds = _open(name, test_name, data_dir)
  class_names = _class_names(train_ds, name)
  # split -> (data source, positions in it, source name).
  if val_name is not None:
    val_ds = _open(name, val_name, data_dir)
    bases = {"train": (train_ds, np.arange(len(train_ds)), f"{name}:{train_name}"),
             "val": (val_ds, np.arange(len(val_ds)), f"{name}:{val_name}")}
  else:
    n = len(train_ds)
    order = np.random.default_rng([seed, n]).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 1:
      raise ValueError(f"{name}: train has {n} examples, too few to carve a validation "
                       f"split with config.data.val_fraction={val_fraction}.")
    bases = {"train": (train_ds, np.sort(order[n_val:]), f"{name}:train"),
             "val": (train_ds, np.sort(order[:n_val]), f"{name}:val")}
  bases["test"] = (test_ds, np.arange(len(test_ds)), f"{name}:{test_name}")

  all_labels: dict[int, np.ndarray] = {}  # id(data source) -> labels, read once.

  def labels_of(split: str):
    ds, positions, _ = bases[split]

    def read() -> np.ndarray:
      if id(ds) not in all_labels:
        all_labels[id(ds)] = read_labels(ds)
      return all_labels[id(ds)][positions]
    return read

  def make(split: str, positions: np.ndarray, labels: Optional[np.ndarray]) -> TfdsSource:
    ds, _, source_name = bases[split]
    return TfdsSource(ds, positions, labels, bbox_crop, source_name)

  parts = {s: (positions, labels_of(s)) for s, (_, positions, _) in bases.items()}
  return splits.make_splits(cfg, parts, class_names, make, name)
