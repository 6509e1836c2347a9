"""config.data.unknown_root: another data set's images as the open-set unknowns
(impostor paper section 4.2), from a folder or a registered source."""

import json

import ml_collections
import numpy as np
from PIL import Image
import pytest

from fgjax import data
from fgjax import train
from fgjax.data import unknown
from tests.conftest import require_cars196
from tests.train_helpers import small_config


def _noise_folder(root, n=12):
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True)
  for i in range(n):
    where = root / "sub" if i % 2 else root
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        where / f"{i}.png")
  (root / "notes.txt").write_text("not an image")
  (root / ".hidden.png").write_bytes(b"garbage")
  return root


def test_a_folder_of_images_becomes_the_unknown_split(tmp_path):
  root = _noise_folder(tmp_path / "noise")
  cfg = ml_collections.ConfigDict(dict(source="digits", split="train:0.6,val:0.2,test:0.2",
                                       unknown_root=str(root)))
  splits = data.get_splits(cfg)
  assert len(splits.unknown) == 12  # recursive; the text and hidden files ignored
  assert set(splits.unknown.labels.tolist()) == {-1}
  assert splits.unknown_class_names == [str(root)]
  cfg.holdout_classes = (3,)
  with pytest.raises(ValueError, match="unknown_root and config.data.holdout_classes"):
    data.get_splits(cfg)
  cfg.holdout_classes = ()
  cfg.unknown_root = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="neither a folder nor a data source"):
    data.get_splits(cfg)
  cfg.unknown_root = "digits"
  with pytest.raises(ValueError, match="the training data set itself"):
    data.get_splits(cfg)


def test_a_named_source_gives_its_test_split():
  require_cars196()
  cfg = ml_collections.ConfigDict(dict(source="digits"))
  source, names = unknown.unknown_images("cars196", cfg)
  assert len(source) == 2452 and names == ["cars196:test"]  # cars196 README: 2,452
  assert all("/test/" in p for p in source.paths)


def test_training_reports_the_open_set_against_the_unknowns(tmp_path):
  root = _noise_folder(tmp_path / "noise", n=40)
  config = small_config("loose", steps=20, **{"data.unknown_root": str(root),
                                              "export.int8_calibration_images": 0})
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  report = results["openset"]
  assert report["num_unknown"] == 40
  assert 0.0 <= report["auroc"] <= 1.0
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["openset"]["auroc"] == report["auroc"]
