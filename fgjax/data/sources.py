"""Random-access data sources: image folders, birds525, scikit-learn digits.

A source is a sequence: `len(source)` and `source[i] -> record` with
  {'image': uint8 (H, W, 3) RGB, 'label': int, 'index': int}
where `index == i` is the example's position within its split (the trainer uses it
as the id of the impostor the example owns). Every source also carries
`labels` (int32 (N,), so labels never need an image decode), `name`, and
`bad_files` (files dropped when the source was built).

Split rules live here (DESIGN.md: "split rules live with the data source"):
  * 'canonical': the source's standard split. Image folders / birds525: files
    named `<n>.<ext>`; n in {1, 2, 3} -> train, 4 -> val, 5 -> test (birds525's
    README). digits: the stratified 'train:0.6,val:0.2,test:0.2' split.
  * per-class counts 'train:3,val:1,test:1' or fractions
    'train:0.6,val:0.2,test:0.2': every class's files are shuffled with
    (data.seed, class index) and cut in that order, so the split is stratified
    and deterministic. Counts must fit in every class; files beyond the counts are
    unused. Fractions are rounded per class by the largest-remainder rule.

Bad files: every file of an image folder is decoded once when the source is built
(JPEGs at 1/8 scale, on a thread pool: about a second for birds525's 2,625 files);
files that cannot be decoded (garbage, truncated: PIL's LOAD_TRUNCATED_IMAGES stays
off, see transforms.py) are dropped, listed in
`source.bad_files` and in one warning. A file that still fails at iteration time
(changed on disk, flaky network file system) is replaced by the next readable
example of the split with `valid=False`, counted in `source.read_failures` and
warned about, so a long run never dies on one file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import re
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fgjax.data import transforms

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".jfif"})
SPLIT_NAMES = ("train", "val", "test")
SOURCES = ("image_folder", "birds525", "tfds", "digits")
DIGITS_CANONICAL = "train:0.6,val:0.2,test:0.2"


@dataclasses.dataclass
class Splits:
  """The splits of one data set. `val` and `unknown` may be None.

  Attributes:
    train, val, test: random-access sources over the known classes.
    class_names: names of the known classes; labels index this list.
    unknown: test images of `data.holdout_classes` (label -1) for open-set
      evaluation, else None.
    unknown_class_names: names of the held-out classes.
  """
  train: Any
  val: Optional[Any]
  test: Any
  class_names: list[str]
  unknown: Optional[Any] = None
  unknown_class_names: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


class FileSource:
  """Images decoded from files on access; see the module docstring for records."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], name: str = "",
               bad_files: Sequence[str] = ()):
    if len(paths) != len(labels):
      raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
    self.paths = [str(p) for p in paths]
    self.labels = np.asarray(labels, np.int32).reshape(-1)
    self.name = name
    self.bad_files = list(bad_files)
    self.read_failures: list[str] = []  # Per process: grain workers count their own.

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self.paths)
    i = int(i)
    if not 0 <= i < n:
      raise IndexError(f"index {i} out of range for {self.name or 'source'} of size {n}.")
    for k in range(n):
      j = (i + k) % n
      try:
        image = transforms.decode_image(self.paths[j])
      except Exception as e:  # pylint: disable=broad-except
        self.read_failures.append(self.paths[j])
        warnings.warn(f"fgjax.data: cannot decode {self.paths[j]} ({e!r}); substituting "
                      "the next readable example of the split (valid=False).",
                      RuntimeWarning, stacklevel=2)
        continue
      rec = {"image": image, "label": int(self.labels[j]), "index": j}
      if j != i:
        rec["valid"] = False
      return rec
    raise OSError(f"no file of {self.name or 'source'} can be decoded any more "
                  f"(first: {self.paths[0] if n else None}).")

  def __repr__(self) -> str:
    return f"FileSource(name={self.name!r}, len={len(self)})"


class ArraySource:
  """Images held in memory: uint8 (N, H, W, 3) and labels (N,)."""

  def __init__(self, images: np.ndarray, labels: Sequence[int], name: str = ""):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                       f"{images.shape}.")
    self.images = images
    self.labels = np.asarray(labels, np.int32).reshape(-1)
    if len(self.labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(self.labels)} labels.")
    self.name = name
    self.bad_files: list[str] = []
    self.read_failures: list[str] = []

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {self.name or 'source'} of size "
                       f"{len(self)}.")
    return {"image": self.images[i], "label": int(self.labels[i]), "index": i}

  def __repr__(self) -> str:
    return f"ArraySource(name={self.name!r}, len={len(self)})"


# ---- split specification ------------------------------------------------------------
def parse_split(spec: str, field: str = "config.data.split") -> tuple[str, dict[str, float]]:
  """Parses a split string into ('canonical', {}) | ('counts' | 'fractions', {name: v})."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"{field} must be 'canonical', per-class counts like "
                     f"'train:3,val:1,test:1' or fractions like 'train:0.6,val:0.2,"
                     f"test:0.2'; got {spec!r}.")
  spec = spec.strip()
  if spec == "canonical":
    return "canonical", {}
  parts: dict[str, str] = {}
  for item in spec.split(","):
    name, sep, value = item.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or name not in SPLIT_NAMES or name in parts:
      raise ValueError(f"{field}={spec!r}: each item must be '<name>:<value>' with a "
                       f"distinct name in {SPLIT_NAMES}; bad item {item!r}.")
    parts[name] = value
  if "train" not in parts or "test" not in parts:
    raise ValueError(f"{field}={spec!r} must name at least 'train' and 'test' "
                     "(e.g. 'train:3,val:1,test:1').")
  if all(re.fullmatch(r"\d+", v) for v in parts.values()):
    counts = {k: float(int(v)) for k, v in parts.items()}
    if counts["train"] < 1 or counts["test"] < 1:
      raise ValueError(f"{field}={spec!r}: train and test need at least 1 image per class.")
    return "counts", counts
  try:
    fracs = {k: float(v) for k, v in parts.items()}
  except ValueError:
    raise ValueError(f"{field}={spec!r}: values must be all integers (per-class counts) "
                     "or all fractions in (0, 1].") from None
  if any(not 0.0 < f <= 1.0 for f in fracs.values()) or sum(fracs.values()) > 1 + 1e-6:
    raise ValueError(f"{field}={spec!r}: fractions must lie in (0, 1] and sum to at "
                     "most 1.")
  return "fractions", fracs


def _fraction_sizes(n: int, fracs: Mapping[str, float]) -> dict[str, int]:
  """Largest-remainder rounding of n * fraction per split; ties go to earlier splits."""
  names = list(fracs)
  quotas = np.array([fracs[k] * n for k in names])
  sizes = np.floor(quotas + 1e-9).astype(int)
  total = int(round(sum(fracs.values()) * n))
  order = sorted(range(len(names)), key=lambda t: (-(quotas[t] - sizes[t]), t))
  for t in order[:max(total - int(sizes.sum()), 0)]:
    sizes[t] += 1
  return dict(zip(names, (int(s) for s in sizes)))


def stratified_split(labels: np.ndarray, kind: str, values: Mapping[str, float],
                     seed: int, class_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Per-class split of example positions by counts or fractions (module docstring).

  Args:
    labels: int (N,) class of every example.
    kind: 'counts' or 'fractions' (from parse_split).
    values: {split name: count or fraction}, in cut order.
    seed: shuffles each class c with np.random.default_rng([seed, c]).
    class_names: for error messages.
  Returns:
    {split name: sorted int64 positions into labels}.
  """
  labels = np.asarray(labels)
  out: dict[str, list[np.ndarray]] = {k: [] for k in values}
  names = [k for k in SPLIT_NAMES if k in values]
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
    if kind == "counts":
      sizes = {k: int(values[k]) for k in names}
      if sum(sizes.values()) > len(members):
        cname = class_names[c] if len(class_names) > c else str(c)
        raise ValueError(f"config.data.split asks for {sum(sizes.values())} images per "
                         f"class but class {cname!r} has {len(members)}; lower the counts.")
    else:
      sizes = _fraction_sizes(len(members), {k: values[k] for k in names})
    start = 0
    for k in names:
      out[k].append(members[start:start + sizes[k]])
      start += sizes[k]
  return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64)
          for k, v in out.items()}


def canonical_split(paths: Sequence[str], field: str = "config.data.split"
                    ) -> dict[str, np.ndarray]:
  """birds525 numbering: `<n>.<ext>` with n in 1..3 train, 4 val, 5 test."""
  out: dict[str, list[int]] = {k: [] for k in SPLIT_NAMES}
  by_number = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
  for pos, p in enumerate(paths):
    stem = pathlib.Path(p).stem
    if not stem.isdigit() or int(stem) not in by_number:
      raise ValueError(f"{field}='canonical' needs files named 1..5.<ext> (birds525 "
                       f"numbering) but found {p}; use per-class counts such as "
                       "'train:3,val:1,test:1' for other folders.")
    out[by_number[int(stem)]].append(pos)
  return {k: np.asarray(v, np.int64) for k, v in out.items()}


# ---- image folders -------------------------------------------------------------------
def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
  """Lists `<root>/<class>/<image>` files.

  Hidden entries (names starting with '.') and files whose extension is not an
  image extension are ignored, as are sub-folders inside class folders. Classes are
  indexed by sorted folder name.

  Returns:
    (class_names, file paths sorted by (class, file name), labels int32 (N,)).
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"config.data.root: image folder {root} does not exist; point "
                            "--config.data.root at a folder of <class>/<image> files.")
  class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
  class_names, paths, labels = [], [], []
  for d in class_dirs:
    files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
      continue  # A folder without images is not a class.
    label = len(class_names)
    class_names.append(d.name)
    paths.extend(str(f) for f in files)
    labels.extend([label] * len(files))
  if not class_names:
    raise ValueError(f"config.data.root: {root} has no <class>/<image> files (extensions "
                     f"{sorted(IMAGE_EXTENSIONS)}).")
  return class_names, paths, np.asarray(labels, np.int32)


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


def _class_selection(cfg, num_all: int, class_names: Sequence[str]
                     ) -> tuple[list[int], list[int]]:
  """(known class ids, held-out class ids) from data.classes_subset / holdout_classes."""
  def ids(field: str) -> list[int]:
    value = cfg.get(field, None) if hasattr(cfg, "get") else getattr(cfg, field, None)
    if value is None or (isinstance(value, str) and not value):
      return []
    if isinstance(value, (int, np.integer)) or isinstance(value, str):
      raise ValueError(f"config.data.{field} must be a list of class indices, got "
                       f"{value!r}; e.g. --config.data.{field}='(0, 5, 7)'.")
    out = []
    for v in value:
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < num_all:
        raise ValueError(f"config.data.{field} holds {v!r}; class indices must be ints in "
                         f"[0, {num_all}) (sorted class folder order).")
      out.append(int(v))
    if len(set(out)) != len(out):
      raise ValueError(f"config.data.{field} has duplicates: {value!r}.")
    return out

  subset = ids("classes_subset") or list(range(num_all))
  holdout = ids("holdout_classes")
  missing = [c for c in holdout if c not in subset]
  if missing:
    raise ValueError(f"config.data.holdout_classes {missing} are not in "
                     "config.data.classes_subset; add them there or drop them.")
  known = [c for c in sorted(subset) if c not in holdout]
  if len(known) < 2:
    raise ValueError("config.data.classes_subset / holdout_classes leave fewer than 2 "
                     f"known classes (of {len(class_names)}).")
  return known, sorted(holdout)


def splits_from_files(cfg, class_names: list[str], paths: list[str], labels: np.ndarray,
                      bad_files: Sequence[str], name: str) -> Splits:
  """Applies data.split / classes_subset / holdout_classes to a scanned folder."""
  kind, values = parse_split(cfg.get("split", "canonical"))
  seed = _seed(cfg)
  if kind == "canonical":
    parts = canonical_split(paths)
  else:
    parts = stratified_split(labels, kind, values, seed, class_names)
  known, holdout = _class_selection(cfg, len(class_names), class_names)
  remap = np.full(len(class_names), -2, np.int64)
  remap[known] = np.arange(len(known))
  remap[holdout] = -1

  def make(split: str, keep: int) -> Optional[FileSource]:
    pos = parts.get(split)
    if pos is None:
      return None
    new = remap[labels[pos]]
    pos = pos[(new >= 0) if keep >= 0 else (new == -1)]
    if not len(pos):
      return None
    return FileSource([paths[p] for p in pos], remap[labels[pos]],
                      name=f"{name}:{split}", bad_files=bad_files)

  train, test = make("train", 0), make("test", 0)
  if train is None or test is None:
    raise ValueError(f"config.data.split={cfg.get('split')!r} leaves the train or test "
                     f"split of {name} empty.")
  return Splits(train=train, val=make("val", 0), test=test,
                class_names=[class_names[c] for c in known],
                unknown=make("test", -1) if holdout else None,
                unknown_class_names=[class_names[c] for c in holdout])


def image_folder_splits(cfg, root: str | os.PathLike, name: str = "image_folder") -> Splits:
  """Scans, validates (drops undecodable files with a warning) and splits a folder."""
  class_names, paths, labels = scan_image_folder(root)
  validate = cfg.get("validate", True) if hasattr(cfg, "get") else True
  bad = find_bad_files(paths) if validate else []
  if bad:
    bad_paths = {b.split(": ", 1)[0] for b in bad}
    keep = [i for i, p in enumerate(paths) if p not in bad_paths]
    msg = (f"fgjax.data: dropped {len(bad)} of {len(paths)} files under {root} that "
           "cannot be decoded:\n  " + "\n  ".join(bad))
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    logging.warning(msg)
    paths = [paths[i] for i in keep]
    labels = labels[keep]
  return splits_from_files(cfg, class_names, paths, labels, bad, name)


def default_birds525_root() -> pathlib.Path:
  """../shared/data/birds525 next to the repo (package location), else next to cwd."""
  repo = pathlib.Path(__file__).resolve().parents[2]
  for base in (repo, pathlib.Path.cwd()):
    candidate = base.parent / "shared" / "data" / "birds525"
    if candidate.is_dir():
      return candidate
  return repo.parent / "shared" / "data" / "birds525"


def birds525_splits(cfg) -> Splits:
  """birds525 with its canonical 3/1/1 split (or any data.split given)."""
  root = cfg.get("root", "") or default_birds525_root()
  if not pathlib.Path(root).is_dir():
    raise FileNotFoundError(f"birds525 not found at {root} (config.data.root); set "
                            "--config.data.root=/path/to/birds525.")
  return image_folder_splits(cfg, root, name="birds525")


# ---- digits --------------------------------------------------------------------------
def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's load_digits: uint8 (1797, 8, 8, 3) in 0..255 and labels (1797,).

  Pixel values 0..16 are scaled by 255 / 16 and rounded; the channel is replicated.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  gray = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int32)


def digits_splits(cfg) -> Splits:
  """Digits with a stratified split ('canonical' = 'train:0.6,val:0.2,test:0.2')."""
  spec = cfg.get("split", "canonical")
  kind, values = parse_split(DIGITS_CANONICAL if spec == "canonical" else spec)
  images, labels = digits_images()
  class_names = [str(d) for d in range(10)]
  parts = stratified_split(labels, kind, values, _seed(cfg), class_names)
  known, holdout = _class_selection(cfg, 10, class_names)
  remap = np.full(10, -2, np.int64)
  remap[known] = np.arange(len(known))
  remap[holdout] = -1

  def make(split: str, unknown: bool) -> Optional[ArraySource]:
    if split not in parts:
      return None
    pos = parts[split]
    new = remap[labels[pos]]
    pos = pos[new == -1] if unknown else pos[new >= 0]
    return ArraySource(images[pos], remap[labels[pos]], name=f"digits:{split}") \
        if len(pos) else None

  return Splits(train=make("train", False), val=make("val", False),
                test=make("test", False), class_names=[class_names[c] for c in known],
                unknown=make("test", True) if holdout else None,
                unknown_class_names=[class_names[c] for c in holdout])


# ---- entry point ---------------------------------------------------------------------
def _seed(cfg) -> int:
  seed = cfg.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"config.data.seed must be an int, got {seed!r}.")
  return int(seed)


def get_splits(cfg) -> Splits:
  """Builds train / val / test (and unknown) sources from the config's `data` field.

  Args:
    cfg: ml_collections.ConfigDict (or dict) with the fields documented in
      fgjax/data/__init__.py.
  Returns:
    Splits.
  Raises:
    ValueError naming `config.data.<field>` for bad values, FileNotFoundError for
    missing data; both before any image is decoded for training.
  """
  if isinstance(cfg, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    cfg = ml_collections.ConfigDict(cfg)
  source = cfg.get("source", None)
  if source not in SOURCES:
    raise ValueError(f"config.data.source must be one of {SOURCES}, got {source!r}.")
  parse_split(cfg.get("split", "canonical"))  # Fail on a bad split before any I/O.
  _seed(cfg)
  if source == "digits":
    return digits_splits(cfg)
  if source == "birds525":
    return birds525_splits(cfg)
  if source == "image_folder":
    root = cfg.get("root", "")
    if not root:
      raise ValueError("config.data.root must name the image folder for "
                       "source='image_folder' (<root>/<class>/<image>).")
    return image_folder_splits(cfg, root)
  from fgjax.data import tfds_sources  # pylint: disable=g-import-not-at-top
  return tfds_sources.tfds_splits(cfg)
