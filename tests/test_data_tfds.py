"""TFDS sources through `tfds.data_source`, tested offline with tfds.testing.mock_data."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS sources need it")

from fgjax import data  # noqa: E402
from fgjax.data import tfds as tfds_source  # noqa: E402
from fgjax.data import transforms  # noqa: E402
from tests.data_helpers import data_config  # noqa: E402


def _cfg(**kw):
  return data_config(source="tfds", **kw)


def test_mock_patches_data_source_and_val_is_carved():
  with tfds.testing.mock_data(num_examples=20):
    splits = data.get_splits(_cfg(tfds_name="caltech_birds2011", bbox_crop=True))
    raw = tfds.data_source("caltech_birds2011", split="train")
    assert splits.num_classes == 200
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 20)
    both = np.concatenate([splits.train.positions, splits.val.positions])
    np.testing.assert_array_equal(np.sort(both), np.arange(20))
    rec = splits.val[1]
    ex = raw[int(splits.val.positions[1])]
    np.testing.assert_array_equal(rec["image"],
                                  transforms.crop_box(ex["image"], ex["bbox"]))
    assert rec["label"] == int(ex["label"]) and rec["index"] == 1
    again = data.get_splits(_cfg(tfds_name="caltech_birds2011", bbox_crop=True))
    np.testing.assert_array_equal(again.val.positions, splits.val.positions)
    batch = next(data.make_iterator(splits.train, batch_size=4, train=True, seed=0,
                                    image_size=16, resize_size=20, mean=(0,), std=(1,),
                                    process_index=0, process_count=1))
    assert batch["image"].shape == (4, 16, 16, 3)


def test_flowers_uses_its_validation_split_and_dogs_union_box():
  with tfds.testing.mock_data(num_examples=6):
    flowers = data.get_splits(_cfg(tfds_name="oxford_flowers102"))
    assert flowers.num_classes == 102
    assert (len(flowers.train), len(flowers.val), len(flowers.test)) == (6, 6, 6)
    assert flowers.val.name == "oxford_flowers102:validation"
    dogs = data.get_splits(_cfg(tfds_name="stanford_dogs", bbox_crop=True))
    ex = tfds.data_source("stanford_dogs", split="test")[0]
    np.testing.assert_array_equal(
        dogs.test[0]["image"],
        transforms.crop_box(ex["image"], transforms.union_bbox(ex["objects"]["bbox"])))
    with pytest.raises(ValueError, match="bbox_crop"):
      data.get_splits(_cfg(tfds_name="oxford_flowers102", bbox_crop=True)).train[0]


def test_missing_data_error_says_where_and_how(tmp_path):
  with pytest.raises(data.TfdsDataMissingError) as e:
    data.get_splits(_cfg(tfds_name="cars196", tfds_data_dir=str(tmp_path)))
  msg = str(e.value)
  assert str(tmp_path) in msg and "--config.data.tfds_data_dir" in msg
  assert "tfds build cars196" in msg and "[prepare]" in msg


@pytest.mark.parametrize("kw,match", [
    ({"tfds_name": ""}, "config.data.tfds_name"),
    ({"tfds_name": "no_such_dataset_xyz"}, "config.data.tfds_name"),
    ({"tfds_name": "cars196", "split": "train:3,test:1"}, "config.data.split"),
    ({"tfds_name": "cars196", "holdout_classes": 3}, "config.data.holdout_classes"),
    ({"tfds_name": "cars196", "classes_subset": (0, 0)}, "config.data.classes_subset"),
])
def test_bad_tfds_config(tmp_path, kw, match):
  cfg = {**_cfg(tfds_data_dir=str(tmp_path)).to_dict(), **kw}  # Plain: no type check.
  with pytest.raises(ValueError, match=match):
    data.get_splits(cfg)


def test_missing_data_error_is_exported():
  assert data.TfdsDataMissingError is tfds_source.TfdsDataMissingError
  assert issubclass(data.TfdsDataMissingError, FileNotFoundError)


def test_classes_subset_and_holdout():
  with tfds.testing.mock_data(num_examples=40):
    raw_train = tfds.data_source("caltech_birds2011", split="train")
    raw_test = tfds.data_source("caltech_birds2011", split="test")
    train_labels = np.array([int(raw_train[i]["label"]) for i in range(40)])
    test_labels = np.array([int(raw_test[i]["label"]) for i in range(40)])
    holdout = int(test_labels[0])
    subset = sorted({holdout, *test_labels[1:8].tolist(), *train_labels[:8].tolist()})
    assert len(subset) >= 4  # Mock labels are random over 200 classes.
    known = [c for c in subset if c != holdout]
    remap = {c: k for k, c in enumerate(known)}
    names = raw_train.dataset_info.features["label"].names
    everything = data.get_splits(_cfg(tfds_name="caltech_birds2011"))
    splits = data.get_splits(_cfg(tfds_name="caltech_birds2011",
                                  classes_subset=tuple(subset),
                                  holdout_classes=(holdout,)))
    assert splits.class_names == [names[c] for c in known]
    assert splits.unknown_class_names == [names[holdout]]
    # Known-class test set: every test record of a known class, none held out.
    expect = [i for i in range(40) if test_labels[i] in remap]
    np.testing.assert_array_equal(splits.test.positions, expect)
    np.testing.assert_array_equal(splits.test.labels,
                                  [remap[test_labels[i]] for i in expect])
    assert holdout not in test_labels[splits.test.positions]
    # Unknown: the test records of the held-out class, label -1.
    np.testing.assert_array_equal(splits.unknown.positions,
                                  np.flatnonzero(test_labels == holdout))
    assert len(splits.unknown) >= 1 and set(splits.unknown.labels) == {-1}
    rec = splits.unknown[0]
    assert rec["label"] == -1 and rec["index"] == 0
    # Train / val: the same carve-out as without a selection, filtered by class.
    for part, full in [(splits.train, everything.train), (splits.val, everything.val)]:
      if part is None:
        assert not any(train_labels[p] in remap for p in full.positions)
        continue
      keep = [p for p in full.positions if train_labels[p] in remap]
      np.testing.assert_array_equal(part.positions, keep)
      np.testing.assert_array_equal(part.labels, [remap[train_labels[p]] for p in keep])
    rec = splits.train[len(splits.train) - 1]
    assert rec["label"] == splits.train.labels[-1]
    assert rec["index"] == len(splits.train) - 1
    with pytest.raises(ValueError, match=r"config.data.holdout_classes .*\[0, 200\)"):
      data.get_splits(_cfg(tfds_name="caltech_birds2011", holdout_classes=(200,)))
