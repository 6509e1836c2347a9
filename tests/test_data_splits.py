"""Tests for fgjax.data.splits: split specifications, class selection, make_splits."""

import ml_collections
import numpy as np
import pytest

from fgjax import data
from fgjax.data import splits


def test_parse_split():
  assert splits.parse_split("canonical") == ("canonical", {})
  assert splits.parse_split("train:3,val:1,test:1") == (
      "counts", {"train": 3.0, "val": 1.0, "test": 1.0})
  assert splits.parse_split("train:0.7, test:0.3")[0] == "fractions"
  for bad in ["", "train:3", "train:3,tst:1", "train:0.8,test:0.5", "train:a,test:1",
              "train:3,train:1,test:1", "train:0,test:1"]:
    with pytest.raises(ValueError, match="config.data.split"):
      splits.parse_split(bad)


def test_stratified_split_counts_and_fractions():
  labels = np.repeat(np.arange(4), [5, 6, 7, 10])
  parts = splits.stratified_split(labels, "counts", {"train": 3, "val": 1, "test": 1}, 0)
  for name, k in [("train", 3), ("val", 1), ("test", 1)]:
    np.testing.assert_array_equal(np.bincount(labels[parts[name]], minlength=4), [k] * 4)
  allpos = np.concatenate(list(parts.values()))
  assert len(np.unique(allpos)) == len(allpos)  # Disjoint.
  again = splits.stratified_split(labels, "counts", {"train": 3, "val": 1, "test": 1}, 0)
  other = splits.stratified_split(labels, "counts", {"train": 3, "val": 1, "test": 1}, 1)
  assert all(np.array_equal(parts[k], again[k]) for k in parts)
  assert not all(np.array_equal(parts[k], other[k]) for k in parts)
  fr = splits.stratified_split(labels, "fractions",
                                {"train": 0.6, "val": 0.2, "test": 0.2}, 0)
  # Largest remainder per class: 5 -> 3/1/1, 6 -> 4/1/1, 7 -> 4/2/1, 10 -> 6/2/2.
  np.testing.assert_array_equal(np.bincount(labels[fr["train"]]), [3, 4, 4, 6])
  np.testing.assert_array_equal(np.bincount(labels[fr["val"]]), [1, 1, 2, 2])
  np.testing.assert_array_equal(np.bincount(labels[fr["test"]]), [1, 1, 1, 2])
  assert sum(len(v) for v in fr.values()) == len(labels)
  with pytest.raises(ValueError, match="class '0' has 5"):
    splits.stratified_split(labels, "counts", {"train": 5, "test": 1}, 0, ["0"] * 4)


def _cfg_dict(**kw):
  return ml_collections.ConfigDict({"split": "canonical", "classes_subset": (),
                                    "holdout_classes": (), **kw})


def test_make_splits_class_selection_and_unknown():
  # Three splits over a base of 12 examples, 4 classes; class 2 held out, 3 not used.
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
  parts = {"train": (np.arange(0, 8), labels[:8]), "test": (np.arange(8, 12), labels[8:]),
           "val": (np.array([], np.int64), labels[:0])}
  made = {}

  def make(split, pos, new):
    made.setdefault(split, []).append((pos.tolist(), new.tolist()))
    return data.ArraySource(np.zeros((len(pos), 1, 1, 3), np.uint8), new, name=split)

  out = splits.make_splits(_cfg_dict(classes_subset=(0, 1, 2), holdout_classes=(2,)),
                               parts, ["a", "b", "c", "d"], make, "toy")
  assert out.class_names == ["a", "b"] and out.unknown_class_names == ["c"]
  assert made["train"] == [([0, 1, 4, 5], [0, 1, 0, 1])]
  # The test split is built twice: known classes, then the held-out class (-1).
  assert made["test"] == [([8, 9], [0, 1]), ([10], [-1])]
  assert out.val is None and "val" not in made  # An empty split is no source.
  np.testing.assert_array_equal(out.unknown.labels, [-1])
  with pytest.raises(ValueError, match="config.data.classes_subset"):
    splits.make_splits(_cfg_dict(classes_subset=(0, 1), holdout_classes=(1,)), parts,
                           ["a", "b", "c", "d"], make, "toy")
  with pytest.raises(ValueError, match="config.data.holdout_classes"):
    splits.make_splits(_cfg_dict(classes_subset=(0, 1, 3), holdout_classes=(2,)),
                           parts, ["a", "b", "c", "d"], make, "toy")
  with pytest.raises(ValueError, match="leaves the train or test split of toy empty"):
    splits.make_splits(_cfg_dict(), {"train": parts["train"]}, ["a", "b", "c", "d"],
                           make, "toy")


def test_make_splits_reads_lazy_labels_only_for_a_selection():
  calls = []

  def lazy(values):
    def read():
      calls.append(values)
      return np.asarray(values)
    return read

  parts = {"train": (np.array([5, 6, 7]), lazy([0, 1, 2])),
           "test": (np.array([1, 2]), lazy([2, 0]))}
  got = {}

  def make(split, pos, new):
    got[split] = (pos.tolist(), None if new is None else new.tolist())
    return split

  splits.make_splits(_cfg_dict(), parts, ["a", "b", "c"], make, "toy")
  assert calls == [] and got == {"train": ([5, 6, 7], None), "test": ([1, 2], None)}
  splits.make_splits(_cfg_dict(holdout_classes=(0,)), parts, ["a", "b", "c"], make,
                         "toy")
  assert calls == [[0, 1, 2], [2, 0], [2, 0]]
  assert got == {"train": ([6, 7], [0, 1]), "test": ([2], [-1])}


def test_class_ids_form_is_checked_before_io():
  assert splits.class_ids(_cfg_dict(classes_subset=(3, 1)), "classes_subset") == [3, 1]
  assert splits.class_ids(_cfg_dict(), "holdout_classes") == []
  for bad in [(1, 1), (-1,), ("a",), (True,), 2, "0,1"]:
    with pytest.raises(ValueError, match="config.data.classes_subset"):
      splits.class_ids(_cfg_dict(classes_subset=bad), "classes_subset")
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    splits.class_ids(_cfg_dict(classes_subset=(4,)), "classes_subset", 4)


def test_canonical_split_birds525_numbering_and_seed_field():
  parts = splits.canonical_split(["a/1.jpg", "a/4.png", "b/5.jpg", "b/2.jpg", "b/3.jpg"])
  assert {k: v.tolist() for k, v in parts.items()} == {
      "train": [0, 3, 4], "val": [1], "test": [2]}
  with pytest.raises(ValueError, match="6.jpg"):
    splits.canonical_split(["a/1.jpg", "a/6.jpg"])
  assert splits.config_seed(_cfg_dict(seed=np.int64(4))) == 4
  assert splits.config_seed({}) == 0
  for bad in [True, 1.0, "1"]:
    with pytest.raises(ValueError, match="config.data.seed"):
      splits.config_seed({"seed": bad})
