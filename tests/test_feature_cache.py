"""Head-only runs on cached backbone features: same numbers, backbone run once per sweep."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import feature_cache
from fgjax import split_outputs
from fgjax import train
from fgjax.data import transforms
from fgjax.models import registry
from fgjax.models import segments
from tests.train_helpers import read_losses
from tests.train_helpers import restored
from tests.train_helpers import small_config


def head_config(cache_dir="", scheme="fixed", steps=6, **overrides):
  return small_config(scheme, steps=steps, **{"model.trainable": "head",
                                              "train.cache_features": True,
                                              "train.feature_cache_dir": cache_dir,
                                              **overrides})


@pytest.mark.parametrize("pooling", ["avg", "kmax"])
def test_split_outputs_from_features_equal_full_forward(tmp_path, pooling):
  # 'avg' caches the pooled features, 'kmax' the last conv map.
  run = train.Run(head_config(**{"model.pooling": pooling}))
  assert run.network.reads == (("pooled",) if pooling == "avg" else ("map",))
  variables = run.initial_state().variables()
  full = split_outputs.SplitOutputs(run.network, run.splits, run.mesh, small_config(),
                                    run.initial_variables)
  assert not full.cache_features
  for split in ("train", "val", "test"):
    heads_only = run.outputs.outputs(variables, split, ("embedding",))
    want = full.outputs(variables, split, ("embedding",))
    np.testing.assert_array_equal(heads_only["index"], np.arange(len(want["index"])))
    np.testing.assert_array_equal(heads_only["index"], want["index"])
    np.testing.assert_array_equal(heads_only["label"], want["label"])
    np.testing.assert_allclose(heads_only["embedding"], want["embedding"],
                               rtol=1e-5, atol=1e-6)


def test_shared_cache_dir_skips_the_backbone_and_gives_same_results(tmp_path, monkeypatch):
  cache = tmp_path / "features"
  first = train.train_and_evaluate(head_config(str(cache)), str(tmp_path / "a"))
  files = sorted(os.listdir(cache))
  assert len(files) == 3 and all(f.endswith(".npz") for f in files)  # train, val, test

  def no_backbone(*args, **kwargs):
    raise AssertionError("the backbone ran although its features were cached")

  monkeypatch.setattr(split_outputs.SplitOutputs, "_image_outputs", no_backbone)
  second = train.train_and_evaluate(head_config(str(cache)), str(tmp_path / "b"))
  assert sorted(os.listdir(cache)) == files
  for split in ("val", "test"):
    assert second["splits"][split]["rbf"] == first["splits"][split]["rbf"]
  assert second["sigma"] == first["sigma"]


def test_fingerprint_separates_what_changes_features(tmp_path):
  config = head_config()
  splits = train.Run(config).splits
  out = ("pooled",)
  trunk = {"backbone": "small_cnn", "pretrained": False}
  key = feature_cache.fingerprint(config, "val", splits.val, out, trunk)
  assert key == feature_cache.fingerprint(head_config(), "val", splits.val, out, trunk)
  # An open-set source beside the run leaves the known splits' features (and keys) alone.
  with_unknown = head_config()
  with_unknown.data.unknown_root = "birds525"
  assert key == feature_cache.fingerprint(with_unknown, "val", splits.val, out, trunk)
  assert key != feature_cache.fingerprint(config, "test", splits.test, out, trunk)
  assert key != feature_cache.fingerprint(config, "val", splits.val, ("map",), trunk)
  assert key != feature_cache.fingerprint(config, "val", splits.val, out,
                                          {**trunk, "init_from": ["/w", 6, 1]})
  other = head_config()
  other.data.seed = 1  # another stratified split of the digits
  assert key != feature_cache.fingerprint(other, "val", splits.val, out, trunk)
  bigger = head_config()
  bigger.input.resize_size = 10
  assert key != feature_cache.fingerprint(bigger, "val", splits.val, out, trunk)
  weights = tmp_path / "w.pth"
  weights.write_bytes(b"x")
  assert key != feature_cache.fingerprint(
      config, "val", splits.val, out,
      {**trunk, "weights": feature_cache.file_stamp(str(weights))})


def test_unreadable_cache_file_names_it(tmp_path):
  path = tmp_path / "features_k.npz"
  path.write_bytes(b"not an npz")
  with pytest.raises(OSError, match="features_k.npz.*delete it"):
    feature_cache.load_or_compute(str(tmp_path), "k", lambda: {}, ("pooled",))


def test_load_or_compute_writes_once_and_reads_back(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return {"map": np.ones((3, 2, 2, 4), np.float32), "label": np.arange(3),
            "index": np.arange(3)}

  a = feature_cache.load_or_compute(str(tmp_path), "k", compute, ("map",))
  b = feature_cache.load_or_compute(str(tmp_path), "k", compute, ("map",))
  assert len(calls) == 1
  np.testing.assert_array_equal(a["map"], b["map"])
  assert set(b) == {"map", "label", "index"}
  assert os.listdir(tmp_path) == ["features_k.npz"]  # no temporary file left behind


def test_cache_dir_without_cached_features_is_a_config_error(tmp_path):
  config = small_config("fixed", steps=2, **{"train.feature_cache_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="config.train.feature_cache_dir"):
    train.Run(config)
  # A backbone that trains whole has no fixed outputs to cache.
  config = small_config("fixed", steps=2, **{"train.cache_features": True})
  with pytest.raises(ValueError, match=r"needs config.model.trainable='head' or 'last:N'"):
    train.Run(config)


def test_init_from_head_only_caches_the_loaded_backbone(tmp_path):
  # Stage 1 trains the whole network; a head-only stage 2 from it must cache features
  # of the trained backbone, not of the registry's initial one.
  stage1 = small_config("ce", steps=4)
  train.train_and_evaluate(stage1, str(tmp_path / "s1"))
  stage2 = head_config(str(tmp_path / "cache"), "ce", steps=2,
                       **{"init_from": str(tmp_path / "s1")})
  run = train.Run(stage2)
  cached = run.outputs.backbone_features("val")["pooled"]
  variables = run.initial_variables()
  direct = run.network.module.apply(
      variables, jnp.asarray(_val_images(run)), train=False)["pooled"]
  np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)
  fresh = train.Run(head_config(str(tmp_path / "cache"), "ce", steps=2))
  assert np.abs(fresh.outputs.backbone_features("val")["pooled"] - cached).max() > 1e-3


def _val_images(run):
  val = run.splits.val
  spec = run.network.spec
  images = np.stack([transforms.eval_transform(val[i]["image"], image_size=8,
                                               resize_size=8) for i in range(len(val))])
  return transforms.normalize(images, spec.mean, spec.std)


def test_last_n_on_cached_outputs_trains_like_the_uncached_run(tmp_path):
  # trainable='last:1' of small_cnn (groups stage0, stage1, stage2): 'stage1' is the
  # last output of the frozen groups, so it is cached and stage2 runs in the head, its
  # BatchNorm on running statistics as in the uncached run ('frozen_bn'). Digits are
  # neither cropped nor flipped, so both runs see the same inputs in the same order.
  overrides = {"model.trainable": "last:1", "train.checkpoint_every_steps": 6}
  cached = small_config("ce", steps=6, **overrides, **{"train.cache_features": True})
  run = train.Run(cached)
  assert run.network.cache_from == "stage1" and run.network.reads == ("stage1",)
  assert run.forward == "heads"
  got = train.train_and_evaluate(cached, str(tmp_path / "cached"))
  want = train.train_and_evaluate(small_config("ce", steps=6, **overrides),
                                  str(tmp_path / "images"))
  np.testing.assert_allclose(list(read_losses(tmp_path / "cached").values()),
                             list(read_losses(tmp_path / "images").values()), rtol=1e-4)
  assert got["splits"]["test"]["softmax"]["top1"] == pytest.approx(
      want["splits"]["test"]["softmax"]["top1"], abs=0.01)
  before = run.initial_state().params["net"]["backbone"]
  after = restored(tmp_path / "cached", cached)[1].params["net"]["backbone"]
  for frozen in ("stage0", "stage1"):
    jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
  assert np.abs(np.asarray(after["stage2"]["conv"]["kernel"])
                - np.asarray(before["stage2"]["conv"]["kernel"])).max() > 0


def test_cached_tail_outputs_equal_full_forward():
  run = train.Run(small_config("ce", **{"model.trainable": "last:2",
                                        "train.cache_features": True}))
  assert run.network.reads == ("stem",)
  variables = run.initial_state().variables()
  full = split_outputs.SplitOutputs(run.network, run.splits, run.mesh, small_config(),
                                    run.initial_variables)
  got = run.outputs.outputs(variables, "val", ("embedding", "logits"))
  want = full.outputs(variables, "val", ("embedding", "logits"))
  for k in ("embedding", "logits"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_cached_tail_needs_a_cut_between_two_outputs():
  # Lite0's stage6 holds blocks 11-14: last:3 (block14, block15, head) cuts inside it;
  # last:2 cuts after it and last:1 after stage7 (block15).
  spec = registry.get("efficientnet_lite0", pretrained=False)
  groups = segments.output_groups(spec.module, spec.outputs, 64)
  assert segments.tail_start(groups, spec.blocks, 1) == "stage7"
  assert segments.tail_start(groups, spec.blocks, 2) == "stage6"
  with pytest.raises(ValueError, match=r"last:3'.*Use last:N for N in \[1, 2, 6, "):
    segments.tail_start(groups, spec.blocks, 3)
  with pytest.raises(ValueError, match="last:18'"):  # every block: nothing to cache
    segments.tail_start(groups, spec.blocks, len(spec.blocks))
