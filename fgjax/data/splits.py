"""Split rules and class selection: the bottom of fgjax.data (NumPy only).

Every source (image folders, digits, TFDS) hands `make_splits` the positions of each
split in some base collection together with their original labels; `make_splits`
applies `config.data.classes_subset` / `holdout_classes` and asks the source to build
one record source per split. Nothing here imports another fgjax.data module.

Split specifications (`config.data.split`):
  * 'canonical': the source's standard split. Image folders / birds525: files named
    `<n>.<ext>`; n in {1, 2, 3} -> train, 4 -> val, 5 -> test (`canonical_split`,
    birds525's README). Split folders `root/{train,val,test}/<class>/<image>`: the
    folders. digits: the stratified 'train:0.6,val:0.2,test:0.2' split. TFDS: the
    data set's own splits.
  * per-class counts 'train:3,val:1,test:1' or fractions
    'train:0.6,val:0.2,test:0.2' (`stratified_split`): every class's examples are
    shuffled with np.random.default_rng([data.seed, class index]) and cut in that
    order, so the split is stratified and deterministic. Counts must fit in every
    class; examples beyond the counts are unused. Fractions are rounded per class by
    the largest-remainder rule.

Class selection (`class_selection`): `classes_subset` (empty: all classes) minus
`holdout_classes` are the known classes, re-indexed 0..K-1 in ascending original
order; the test examples of the held-out classes form `Splits.unknown` with label -1.
Classes outside the subset are dropped from every split.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

SPLIT_NAMES = ("train", "val", "test")

# Labels of a split's positions, or a zero-argument function computing them (called
# only when a class selection needs them: TFDS labels cost a record read each).
LabelsArg = Union[np.ndarray, Sequence[int], Callable[[], np.ndarray]]
# make(split name, positions into the split's base, new labels or None) -> source.
MakeSource = Callable[[str, np.ndarray, Optional[np.ndarray]], Any]


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


# ---- config fields -------------------------------------------------------------------
def config_seed(cfg: Any) -> int:
  """`config.data.seed` as an int (default 0); ValueError naming the field otherwise."""
  seed = cfg.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"config.data.seed must be an int, got {seed!r}.")
  return int(seed)


def class_ids(cfg: Any, field: str, num_classes: Optional[int] = None) -> list[int]:
  """The class indices in `config.data.<field>`; [] when empty or unset.

  Args:
    cfg: the data config.
    field: 'classes_subset' or 'holdout_classes'.
    num_classes: when given, every index must lie in [0, num_classes); without it
      only the form is checked (ints >= 0, no duplicates), before any I/O.
  """
  value = cfg.get(field, None)
  if value is None or (isinstance(value, str) and not value):
    return []
  if isinstance(value, (int, np.integer, str, bytes)):
    raise ValueError(f"config.data.{field} must be a list of class indices, got "
                     f"{value!r}; e.g. --config.data.{field}='(0, 5, 7)'.")
  out = []
  upper = num_classes if num_classes is not None else np.inf
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < upper:
      bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
      raise ValueError(f"config.data.{field} holds {v!r}; class indices must be ints "
                       f"{bound} (sorted class folder order).")
    out.append(int(v))
  if len(set(out)) != len(out):
    raise ValueError(f"config.data.{field} has duplicates: {value!r}.")
  return out


def class_selection(cfg: Any, num_classes: int) -> tuple[list[int], list[int]]:
  """(known class ids, held-out class ids), both ascending (module docstring)."""
  subset = class_ids(cfg, "classes_subset", num_classes) or list(range(num_classes))
  holdout = class_ids(cfg, "holdout_classes", num_classes)
  missing = [c for c in holdout if c not in subset]
  if missing:
    raise ValueError(f"config.data.holdout_classes {missing} are not in "
                     "config.data.classes_subset; add them there or drop them.")
  known = [c for c in sorted(subset) if c not in holdout]
  if len(known) < 2:
    raise ValueError("config.data.classes_subset / holdout_classes leave fewer than 2 "
                     f"known classes (of {num_classes}).")
  return known, sorted(holdout)


# ---- split specification -------------------------------------------------------------
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


# ---- positions + labels -> Splits ----------------------------------------------------
def make_splits(cfg: Any, parts: Mapping[str, tuple[np.ndarray, LabelsArg]],
                class_names: Sequence[str], make: MakeSource, name: str) -> Splits:
  """Applies the class selection to per-split positions and builds the sources.

  Args:
    cfg: the data config (classes_subset, holdout_classes, split for messages).
    parts: {split name: (positions into that split's base, original labels of those
      positions)}; a split missing here (or left empty) becomes None. Labels may be
      a zero-argument function; it is called only when a class selection is set,
      and otherwise `make` receives labels=None (the source reads its own).
    class_names: names of all original classes (labels index it).
    make: builds a source from (split name, positions, new labels int32 or None).
    name: the data set's name, for messages.
  Returns:
    Splits over the known classes (labels 0..K-1), with `unknown` holding the test
    positions of the held-out classes (label -1) when any are held out.
  Raises:
    ValueError naming the config field when the selection is invalid or leaves the
    train or test split empty.
  """
  known, holdout = class_selection(cfg, len(class_names))
  selects = len(known) < len(class_names)
  remap = np.full(len(class_names), -2, np.int64)
  remap[known] = np.arange(len(known))
  remap[holdout] = -1

  def build(split: str, unknown: bool = False) -> Optional[Any]:
    if split not in parts:
      return None
    positions, labels = parts[split]
    positions = np.asarray(positions, np.int64).reshape(-1)
    if not selects and callable(labels):
      new = None
    else:
      labels = np.asarray(labels() if callable(labels) else labels).reshape(-1)
      if len(labels) != len(positions):
        raise ValueError(f"{name}:{split}: {len(positions)} positions but "
                         f"{len(labels)} labels.")
      new = remap[labels]
      keep = (new == -1) if unknown else (new >= 0)
      positions, new = positions[keep], new[keep].astype(np.int32)
    return make(split, positions, new) if len(positions) else None

  train, test = build("train"), build("test")
  if train is None or test is None:
    raise ValueError(f"config.data.split={cfg.get('split', 'canonical')!r} with the "
                     f"class selection leaves the train or test split of {name} empty.")
  return Splits(train=train, val=build("val"), test=test,
                class_names=[class_names[c] for c in known],
                unknown=build("test", unknown=True) if holdout else None,
                unknown_class_names=[class_names[c] for c in holdout])
