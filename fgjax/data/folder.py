"""Image-folder sources: `image_folder`, `birds525` and `cars196`.

Two layouts, told apart by the folder itself:
  * class folders `root/<class>/<image>`: the canonical split is birds525's file
    numbering (`<n>.<ext>`: n in 1..3 train, 4 val, 5 test; splits.canonical_split).
  * split folders `root/{train,val,test}/<class>/<image>` (val optional), chosen when
    `root/train` and `root/test` both hold class folders with images: the canonical
    split is the folders' split. Class names are the sorted union of the class
    folder names; a class that only val or test has is an error (it could never be
    learnt).
Hidden entries (names starting with '.'), files whose suffix is not in
transforms.IMAGE_EXTENSIONS and folders nested inside class folders are ignored; a
folder without images is not a class. Classes are indexed by sorted folder name.

Per-class counts / fractions (`config.data.split`) pool every file of a class (split
folders: in train, val, test order, each sorted by file name) and re-split it with
splits.stratified_split. Within a split, examples are ordered by (class, file name).

Bad files: every file is decoded once when the source is built (JPEGs at 1/8 scale,
on a thread pool: about a second for birds525's 2,625 files); files that cannot be
decoded (garbage, truncated: PIL's LOAD_TRUNCATED_IMAGES stays off, see
transforms.py) are dropped, listed in `source.bad_files` and in one warning
(`config.data.validate=False` skips the check). Failures at iteration time are
handled by records.FileSource.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from fgjax.data import records
from fgjax.data import registry
from fgjax.data import splits
from fgjax.data import transforms

_LAYOUTS = ("<root>/<class>/<image> or <root>/{train,val,test}/<class>/<image>")


@dataclasses.dataclass
class FolderScan:
  """The image files under a root, before validation and splitting.

  Attributes:
    class_names: sorted class folder names; labels index them.
    paths: every image file, ordered by (class, split folder, file name).
    labels: int32 (N,) class of every path.
    folder_split: split folder name of every path ('train' | 'val' | 'test'), or None
      for the class-folder layout.
  """
  class_names: list[str]
  paths: list[str]
  labels: np.ndarray
  folder_split: Optional[np.ndarray] = None

  def keep(self, positions: Sequence[int]) -> "FolderScan":
    """The scan restricted to `positions` (in order)."""
    positions = np.asarray(positions, np.int64)
    return FolderScan(self.class_names, [self.paths[i] for i in positions],
                      self.labels[positions],
                      None if self.folder_split is None else self.folder_split[positions])


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                and f.suffix.lower() in transforms.IMAGE_EXTENSIONS)


def _class_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
  """Sub-folders of `folder` that hold at least one image: the classes."""
  dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
  return [d for d in dirs if _image_files(d)]


def is_split_layout(root: str | os.PathLike) -> bool:
  """Whether root is `root/{train,val,test}/<class>/<image>` (train and test needed)."""
  root = pathlib.Path(root)
  return all((root / s).is_dir() and _class_dirs(root / s) for s in ("train", "test"))


def scan_image_folder(root: str | os.PathLike) -> FolderScan:
  """Lists the image files of either layout (module docstring)."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"config.data.root: image folder {root} does not exist; point "
                            f"--config.data.root at a folder of {_LAYOUTS} files.")
  if is_split_layout(root):
    return _scan_split_folders(root)
  class_names, paths, labels = [], [], []
  for d in _class_dirs(root):
    files = _image_files(d)
    labels.extend([len(class_names)] * len(files))
    class_names.append(d.name)
    paths.extend(str(f) for f in files)
  if not class_names:
    raise ValueError(f"config.data.root: {root} has no {_LAYOUTS} files (extensions "
                     f"{sorted(transforms.IMAGE_EXTENSIONS)}).")
  return FolderScan(class_names, paths, np.asarray(labels, np.int32))


def _scan_split_folders(root: pathlib.Path) -> FolderScan:
  """`root/{train,val,test}/<class>/<image>`; classes of val / test must be in train."""
  per_split = {s: {d.name: _image_files(d) for d in _class_dirs(root / s)}
               for s in splits.SPLIT_NAMES if (root / s).is_dir()}
  for s, classes in per_split.items():
    extra = sorted(set(classes) - set(per_split["train"]))
    if extra:
      raise ValueError(f"config.data.root: {root / s} has class folders that "
                       f"{root / 'train'} lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                       f" ({len(extra)}); every class needs training images: add them "
                       "to train or remove those folders.")
  class_names = sorted(per_split["train"])
  paths, labels, folder_split = [], [], []
  for label, c in enumerate(class_names):
    for s, classes in per_split.items():
      files = classes.get(c, [])
      paths.extend(str(f) for f in files)
      labels.extend([label] * len(files))
      folder_split.extend([s] * len(files))
  return FolderScan(class_names, paths, np.asarray(labels, np.int32),
                    np.asarray(folder_split, dtype=object))


def _check_file(path: str) -> Optional[str]:
  error = transforms.check_image_file(path)
  return None if error is None else f"{path}: {error}"


def find_bad_files(paths: Sequence[str], num_threads: Optional[int] = None) -> list[str]:
  """Decodes every file completely (JPEGs at 1/8 scale: transforms.check_image_file).

  Runs on a thread pool (PIL releases the GIL while decoding).

  Returns:
    'path: error' lines for the files that cannot be decoded.
  """
  num_threads = num_threads or min(8, (os.cpu_count() or 1) + 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return [r for r in pool.map(_check_file, paths) if r is not None]


def _refuse_emptied_classes(result: splits.Splits, root, bad: Sequence[str]) -> None:
  # A class left without training images by the dropped files cannot be learned (and
  # has no impostor), yet would stay in class_names and quietly lower every accuracy.
  counts = np.bincount(np.asarray(result.train.labels), minlength=result.num_classes)
  empty = [result.class_names[c] for c in np.flatnonzero(counts == 0)]
  if empty:
    raise ValueError(
        f"config.data.root: under {root}, class(es) {empty[:5]}"
        f"{' ...' if len(empty) > 5 else ''} ({len(empty)}) have no training image "
        f"left after dropping {len(bad)} undecodable files (first: {bad[0]}). Replace "
        "or remove those files, or leave the class out with "
        "config.data.classes_subset.")


def image_folder_splits(cfg: Any, root: str | os.PathLike, name: str = "image_folder",
                        require_split_layout: bool = False) -> splits.Splits:
  """Scans, validates (drops undecodable files with a warning) and splits a folder."""
  scan = scan_image_folder(root)
  if require_split_layout and scan.folder_split is None:
    raise ValueError(f"config.data.root: {root} is not in the "
                     f"<root>/{{train,val,test}}/<class>/<image> layout that {name} "
                     "ships in; point --config.data.root at that folder.")
  bad = find_bad_files(scan.paths) if cfg.get("validate", True) else []
  if bad:
    bad_paths = {b.split(": ", 1)[0] for b in bad}
    msg = (f"fgjax.data: dropped {len(bad)} of {len(scan.paths)} files under {root} "
           "that cannot be decoded:\n  " + "\n  ".join(bad))
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    logging.warning(msg)
    scan = scan.keep([i for i, p in enumerate(scan.paths) if p not in bad_paths])

  kind, values = splits.parse_split(cfg.get("split", "canonical"))
  if kind != "canonical":
    positions = splits.stratified_split(scan.labels, kind, values,
                                        splits.config_seed(cfg), scan.class_names)
  elif scan.folder_split is None:
    positions = splits.canonical_split(scan.paths)
  else:  # The folders' split; an empty (or missing) val folder gives val None.
    positions = {s: np.flatnonzero(scan.folder_split == s) for s in splits.SPLIT_NAMES}

  def make(split: str, pos: np.ndarray, labels: np.ndarray) -> records.FileSource:
    return records.FileSource([scan.paths[p] for p in pos], labels,
                              name=f"{name}:{split}", bad_files=bad)

  result = splits.make_splits(cfg, {s: (p, scan.labels[p]) for s, p in positions.items()},
                              scan.class_names, make, name)
  if bad:
    _refuse_emptied_classes(result, root, bad)
  return result


def shared_data_root(name: str) -> pathlib.Path:
  """../shared/data/<name> next to the repo (package location), else next to cwd."""
  repo = pathlib.Path(__file__).resolve().parents[2]
  for base in (repo, pathlib.Path.cwd()):
    candidate = base.parent / "shared" / "data" / name
    if candidate.is_dir():
      return candidate
  return repo.parent / "shared" / "data" / name


def _named_root(cfg: Any, name: str) -> pathlib.Path:
  root = pathlib.Path(cfg.get("root", "") or shared_data_root(name))
  if not root.is_dir():
    raise FileNotFoundError(f"{name} not found at {root} (config.data.root); set "
                            f"--config.data.root=/path/to/{name}.")
  return root


@registry.register("image_folder")
def image_folder_source(cfg: Any) -> splits.Splits:
  """Any folder in either layout at config.data.root."""
  root = cfg.get("root", "")
  if not root:
    raise ValueError("config.data.root must name the image folder for "
                     f"source='image_folder' ({_LAYOUTS}).")
  return image_folder_splits(cfg, root)


@registry.register("birds525")
def birds525_source(cfg: Any) -> splits.Splits:
  """birds525 with its canonical 3/1/1 numbering (or any data.split given)."""
  return image_folder_splits(cfg, _named_root(cfg, "birds525"), name="birds525")


@registry.register("cars196")
def cars196_source(cfg: Any) -> splits.Splits:
  """Stanford Cars cropped to the car, in split folders (its README: 60/10/30)."""
  return image_folder_splits(cfg, _named_root(cfg, "cars196"), name="cars196",
                             require_split_layout=True)

