"""TFDS sources through `tfds.data_source`, tested offline with tfds.testing.mock_data."""

import ml_collections
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS sources need it")

from fgjax import data  # noqa: E402
from fgjax.data import tfds_sources  # noqa: E402
from fgjax.data import transforms  # noqa: E402


def _cfg(**kw):
  c = ml_collections.ConfigDict({
      "source": "tfds", "root": "", "split": "canonical", "seed": 0, "tfds_name": "",
      "tfds_data_dir": "", "bbox_crop": False, "holdout_classes": (),
      "classes_subset": ()})
  c.update(kw)
  return c


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
                                  transforms.crop_to_bbox(ex["image"], ex["bbox"]))
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
        transforms.crop_to_bbox(ex["image"], transforms.union_bbox(ex["objects"]["bbox"])))
    with pytest.raises(ValueError, match="bbox_crop"):
      data.get_splits(_cfg(tfds_name="oxford_flowers102", bbox_crop=True)).train[0]


def test_missing_data_error_says_where_and_how(tmp_path):
  with pytest.raises(tfds_sources.TfdsDataMissingError) as e:
    data.get_splits(_cfg(tfds_name="cars196", tfds_data_dir=str(tmp_path)))
  msg = str(e.value)
  assert str(tmp_path) in msg and "--config.data.tfds_data_dir" in msg
  assert "tfds build cars196" in msg and "[prepare]" in msg


@pytest.mark.parametrize("kw,match", [
    ({"tfds_name": ""}, "config.data.tfds_name"),
    ({"tfds_name": "no_such_dataset_xyz"}, "config.data.tfds_name"),
    ({"tfds_name": "cars196", "split": "train:3,test:1"}, "config.data.split"),
    ({"tfds_name": "cars196", "holdout_classes": (1,)}, "holdout_classes"),
])
def test_bad_tfds_config(tmp_path, kw, match):
  with pytest.raises(ValueError, match=match):
    data.get_splits(_cfg(tfds_data_dir=str(tmp_path), **kw))
