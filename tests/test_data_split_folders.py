"""Split-folder image folders `root/{train,val,test}/<class>/<image>` and cars196."""

import pathlib
import warnings

import numpy as np
from PIL import Image
import pytest

from fgjax import data
from fgjax.data import folder
from fgjax.data import splits as splits_lib
from tests.data_helpers import data_config


def _save(path: pathlib.Path, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  rgb = np.random.default_rng(seed).integers(0, 256, (10, 10, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path)


def _make_split_folders(root: pathlib.Path, layout: dict[str, dict[str, int]]
                        ) -> pathlib.Path:
  """layout: {split: {class: number of images}}; files are named img_<k>.png."""
  seed = 0
  for split, classes in layout.items():
    for cls, n in classes.items():
      for k in range(n):
        seed += 1
        _save(root / split / cls / f"img_{split}_{k:02d}.png", seed)
  return root


LAYOUT = {"train": {"b": 4, "a": 3, "c": 5}, "val": {"a": 1, "b": 1},
          "test": {"a": 2, "b": 2, "c": 2}}


def test_canonical_split_is_the_folder_split(tmp_path):
  root = _make_split_folders(tmp_path / "d", LAYOUT)
  (root / "README.md").write_text("a file next to the split folders is ignored")
  assert folder.is_split_layout(root)
  splits = data.get_splits(data_config(root=str(root)))
  assert splits.class_names == ["a", "b", "c"]
  for split, source in [("train", splits.train), ("val", splits.val),
                        ("test", splits.test)]:
    # Ordered by (class, file name), all from the split's own folder.
    expect = [f"{split}/{c}/img_{split}_{k:02d}.png" for c in "abc"
              for k in range(LAYOUT[split].get(c, 0))]
    assert [str(pathlib.Path(p).relative_to(root)) for p in source.paths] == expect
    np.testing.assert_array_equal(
        source.labels, np.repeat([0, 1, 2], [LAYOUT[split].get(c, 0) for c in "abc"]))
    assert source.name == f"image_folder:{split}"
  rec = splits.val[1]
  assert rec["label"] == 1 and rec["index"] == 1 and rec["image"].shape == (10, 10, 3)


def test_split_folders_without_val_have_no_val(tmp_path):
  root = _make_split_folders(tmp_path / "d", {k: v for k, v in LAYOUT.items()
                                              if k != "val"})
  splits = data.get_splits(data_config(root=str(root)))
  assert splits.val is None and len(splits.train) == 12 and len(splits.test) == 6


def test_counts_pool_the_folders_and_resplit_per_class(tmp_path):
  root = _make_split_folders(tmp_path / "d", LAYOUT)
  spec = "train:3,val:1,test:2"
  splits = data.get_splits(data_config(root=str(root), split=spec, seed=3))
  for source, k in [(splits.train, 3), (splits.val, 1), (splits.test, 2)]:
    np.testing.assert_array_equal(np.bincount(source.labels), [k] * 3)
  # The pool: per class, train then val then test files, each sorted by name; cut by
  # the shared stratified split.
  pool = [str(root / s / c / f"img_{s}_{k:02d}.png") for c in "abc"
          for s in ("train", "val", "test") for k in range(LAYOUT[s].get(c, 0))]
  labels = np.repeat([0, 1, 2], [6, 7, 7])
  parts = splits_lib.stratified_split(labels, "counts",
                                      {"train": 3, "val": 1, "test": 2}, 3)
  for split, source in [("train", splits.train), ("val", splits.val),
                        ("test", splits.test)]:
    assert source.paths == [pool[p] for p in parts[split]]
  moved = [p for p in splits.test.paths if "/test/" not in p]
  assert moved, "a re-split must be able to move files across the split folders"
  fractions = data.get_splits(data_config(root=str(root), split="train:0.5,test:0.5", seed=3))
  assert len(fractions.train) + len(fractions.test) == 20 and fractions.val is None


def test_class_only_in_val_or_test_is_an_error(tmp_path):
  root = _make_split_folders(tmp_path / "d", LAYOUT)
  _save(root / "test" / "zebra" / "img_test_00.png", 99)
  with pytest.raises(ValueError, match=r"config.data.root: .*test has class folders "
                                       r".*lacks: \['zebra'\]"):
    data.get_splits(data_config(root=str(root)))


def test_holdout_and_bad_files_in_split_folders(tmp_path):
  root = _make_split_folders(tmp_path / "d", LAYOUT)
  (root / "train" / "a" / "img_train_01.png").write_bytes(b"not a png")
  with pytest.warns(RuntimeWarning, match="dropped 1 of 20 files"):
    splits = data.get_splits(data_config(root=str(root), holdout_classes=(1,)))
  assert splits.class_names == ["a", "c"] and splits.unknown_class_names == ["b"]
  assert [pathlib.Path(p).name for p in splits.train.paths[:2]] == [
      "img_train_00.png", "img_train_02.png"]
  np.testing.assert_array_equal(splits.train.labels, [0, 0] + [1] * 5)
  assert splits.unknown.paths == [str(root / "test" / "b" / f"img_test_{k:02d}.png")
                                  for k in range(2)]
  np.testing.assert_array_equal(splits.unknown.labels, [-1, -1])
  assert all("/b/" not in p for p in splits.test.paths + splits.val.paths)


def test_classes_named_train_and_test_are_a_class_layout(tmp_path):
  # Images directly inside train/ and test/: these are two classes, not splits.
  for cls in ("train", "test"):
    for n in range(1, 6):
      _save(tmp_path / "d" / cls / f"{n}.png", n)
  assert not folder.is_split_layout(tmp_path / "d")
  splits = data.get_splits(data_config(root=str(tmp_path / "d")))
  assert splits.class_names == ["test", "train"] and len(splits.train) == 6


def test_cars196_needs_split_folders(tmp_path):
  for n in range(1, 6):
    _save(tmp_path / "d" / "car_a" / f"{n}.png", n)
    _save(tmp_path / "d" / "car_b" / f"{n}.png", n + 10)
  with pytest.raises(ValueError, match="config.data.root.*cars196"):
    data.get_splits(data_config(source="cars196", root=str(tmp_path / "d")))
  with pytest.raises(FileNotFoundError, match="config.data.root"):
    data.get_splits(data_config(source="cars196", root=str(tmp_path / "missing")))


# ---- cars196 (real data) -------------------------------------------------------------
def test_cars196_canonical(cars196_root):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Every image must decode: no "dropped" warning.
    splits = data.get_splits(data_config(source="cars196", root=""))  # The default root.
  assert pathlib.Path(splits.train.paths[0]).is_relative_to(cars196_root)
  assert splits.num_classes == 196
  assert splits.class_names == sorted(splits.class_names)
  assert splits.class_names[0] == "AM General Hummer SUV 2000"
  assert (len(splits.train), len(splits.val), len(splits.test)) == (4894, 787, 2452)
  assert splits.train.bad_files == [] and splits.unknown is None
  # Per-class min / max from its README.
  for source, lo, hi in [(splits.train, 15, 41), (splits.val, 2, 7),
                         (splits.test, 7, 20)]:
    counts = np.bincount(source.labels, minlength=196)
    assert (counts.min(), counts.max()) == (lo, hi)
  for split, source in [("train", splits.train), ("val", splits.val),
                        ("test", splits.test)]:
    parents = {pathlib.Path(p).parent for p in source.paths}
    assert {p.parent.name for p in parents} == {split}
    assert all(splits.class_names[label] == pathlib.Path(p).parent.name
               for p, label in zip(source.paths, source.labels))
  rec = splits.test[2451]
  assert rec["image"].shape == (256, 256, 3) and rec["image"].dtype == np.uint8
  assert rec["label"] == 195 and rec["index"] == 2451
