"""Divergence guard (fgjax.divergence) and the range checks of predict's options."""

import json
import math
import os
import pathlib

import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from fgjax import data
from fgjax import divergence
from fgjax import predict
from fgjax import train
from fgjax import workdir as workdir_lib
from fgjax.data import transforms
from tests.data_helpers import data_config
from tests.data_helpers import make_folder
from tests.train_helpers import restored
from tests.train_helpers import small_config

_HEALTHY = {"loss": 2.3, "grad_norm": 4.0, "embedding_norm": 12.0}


def _check(metrics, limit=1e6, last_good=8):
  divergence.check(metrics, 9, max_embedding_norm=limit, last_good_step=last_good,
                   checkpoint_dir="/w/checkpoints", learning_rate=1e-3)


def test_healthy_metrics_pass():
  _check(_HEALTHY)
  _check({"loss": 0.0, "grad_norm": 0.0})  # a net without 'embedding'


@pytest.mark.parametrize("key,value,words", [
    ("loss", math.nan, "loss is nan"),
    ("grad_norm", math.inf, "gradient norm is inf"),
    ("embedding_norm", math.nan, "embedding norm is nan"),
    ("embedding_norm", 2e6, "largest embedding norm 2e+06 exceeds "
                            "train.max_embedding_norm=1e+06"),
])
def test_divergence_is_named_with_step_and_kept_checkpoint(key, value, words):
  with pytest.raises(divergence.TrainingDiverged) as e:
    _check({**_HEALTHY, key: value})
  message = str(e.value)
  assert words in message
  assert "at step 9" in message and "(step 8) is kept in /w/checkpoints" in message
  assert "optim.learning_rate (now 0.001)" in message


def test_zero_limit_turns_off_only_the_norm_limit():
  _check({**_HEALTHY, "embedding_norm": 1e30}, limit=0)
  with pytest.raises(divergence.TrainingDiverged, match="no checkpoint had been saved"):
    _check({**_HEALTHY, "loss": math.nan}, limit=0, last_good=None)


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # The reported case: fixed impostors at lr 1e4 used to log 'loss 0.0000' to the end
  # and exit 0 at chance accuracy with embedding norms ~1e15.
  config = small_config("fixed", steps=12, **{"optim.learning_rate": 1e4})
  with pytest.raises(divergence.TrainingDiverged, match="at step 2: largest embedding"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()
  manager = ocp.CheckpointManager(os.path.abspath(tmp_path / "checkpoints"))
  assert manager.all_steps() == [1]  # complete: the async save was waited for
  manager.close()
  _, state = restored(tmp_path, config, 1)
  centers = np.asarray(state.impostors.centers)
  assert centers.shape == (1078, 64) and np.isfinite(centers).all()
  assert np.abs(centers).max() < 1e3  # the state before the blow-up
  # A higher limit is a harmless change: the workdir may resume with it.
  config.train.max_embedding_norm = 0.0
  workdir_lib.check_config(str(tmp_path), config.to_dict())
  rows = pathlib.Path(tmp_path, "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["step"] for r in rows] == [1]  # the diverged step is not logged


@pytest.mark.parametrize("kwargs,match", [
    ({"reject_entropy": -1.0}, "--reject_entropy=-1.0 must be a finite entropy >= 0"),
    ({"reject_entropy": math.nan}, "--reject_entropy=nan"),
    ({"reject_entropy": math.inf}, "--reject_entropy=inf"),
    ({"topk": 0}, "--topk=0 must be >= 1"),
    ({"batch_size": 0}, "--batch_size=0 must be >= 1"),
])
def test_predict_refuses_out_of_range_options(kwargs, match):
  # Checked before the model is touched, so no artifact is needed.
  with pytest.raises(ValueError, match=match.replace("[", r"\[")):
    predict.predict_files(None, ["x.jpg"], **kwargs)


# ---- data: nothing dropped without a word ----------------------------------------------
def test_sixteen_bit_grayscale_keeps_its_brightness(tmp_path):
  # A dark 12-bit exposure in a 16-bit PNG: values 2000..3890 of 65535.
  raw = (np.arange(64).reshape(8, 8) * 30 + 2000).astype(np.uint16)
  Image.fromarray(raw).save(tmp_path / "dark16.png")
  Image.fromarray((raw / 4000).astype(np.float32)).save(tmp_path / "float.tif")
  out = transforms.decode_image(tmp_path / "dark16.png")
  np.testing.assert_array_equal(out[..., 0], np.round(raw.astype(np.float64) * 255 / 65535))
  assert 11 < out.mean() < 12  # dark, as taken: not the 0..255 stretch (mean ~127)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  out = transforms.decode_image(tmp_path / "float.tif")
  np.testing.assert_array_equal(out[..., 0], np.round(
      np.clip(raw.astype(np.float32) / 4000, 0, 1) * 255))


def test_a_class_emptied_by_bad_files_is_refused_by_name(tmp_path):
  root = make_folder(tmp_path / "d")
  for n in range(1, 6):
    (root / "class_01" / f"{n}.png").write_bytes(b"not a png")
  cfg = data_config(root=str(root), split="train:3,val:1,test:1")
  with pytest.warns(RuntimeWarning, match="dropped 5 of 15"), \
      pytest.raises(ValueError, match=r"class\(es\) \['class_01'\] \(1\) have no "
                                      r"training image left after dropping 5 "
                                      r"undecodable files"):
    data.get_splits(cfg)
  cfg.classes_subset = (0, 2)  # the fix the message names
  with pytest.warns(RuntimeWarning, match="dropped 5 of 15"):
    assert data.get_splits(cfg).class_names == ["class_00", "class_02"]


def test_results_json_lists_the_dropped_files(tmp_path):
  root = make_folder(tmp_path / "d", num_classes=4)
  (root / "class_01" / "3.png").write_bytes(b"truncated")
  config = small_config("ce", steps=2, **{"data.source": "image_folder",
                                          "data.root": str(root),
                                          "data.split": "train:0.6,val:0.2,test:0.2",
                                          "input.image_size": 8, "input.resize_size": 8,
                                          "train.batch_size": 4})
  with pytest.warns(RuntimeWarning, match="dropped 1 of 20"):
    results = train.train_and_evaluate(config, str(tmp_path / "w"))
  bad = str(root / "class_01" / "3.png")
  assert [d.split(": ")[0] for d in results["dropped_files"]] == [bad]
  saved = json.loads((tmp_path / "w" / "results.json").read_text())
  assert saved["dropped_files"] == results["dropped_files"]
