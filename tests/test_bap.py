"""Bilinear attention pooling (fgjax.models.bap), the attention center loss
(fgjax.losses.attention, objectives term 'attention_center') and WS-DAN's crops/drops."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fgjax import artifact
from fgjax import config_checks
from fgjax import export
from fgjax import losses
from fgjax import objectives
from fgjax import predict
from fgjax import train
from fgjax.models import bap
from fgjax.models import nets
from tests.test_predict import digits_test_files
from tests.train_helpers import restored
from tests.train_helpers import small_config


def model_config(**overrides):
  c = common.get_config().model
  c.update(dict(backbone="small_cnn", pretrained=False, net="bap", embed_dim=16,
                attention_maps=4))
  c.update(overrides)
  return c


def test_bap_matches_numpy():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  a = rng.uniform(size=(2, 3, 4, 6)).astype(np.float32)
  part, feats = jax.jit(bap.bilinear_attention_pool)(f, a, 100.0)
  want = np.zeros((2, 6, 5))
  for n in range(2):
    for m in range(6):
      want[n, m] = (a[n, ..., m:m + 1] * f[n]).sum((0, 1)) / 12.0
  want = np.sign(want) * np.sqrt(np.abs(want) + 1e-12)
  want /= np.linalg.norm(want.reshape(2, -1), axis=1)[:, None, None]
  np.testing.assert_allclose(part, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats, 100.0 * want.reshape(2, -1), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(part.reshape(2, -1), axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("zero", ["attention", "features", "both"])
def test_bap_gradients_are_finite_at_zero_inputs(zero):
  # A ReLU attention map that is zero over a whole image made the l2 normalisation's
  # gradient 0 / 0 = NaN and killed a Coarse2Fine run at step 36 (BENCHMARKS 17).
  rng = np.random.default_rng(1)
  f = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  a = rng.uniform(size=(2, 3, 3, 2)).astype(np.float32)
  if zero in ("attention", "both"):
    a[0] = 0.0  # image 0: every map zero; image 1 keeps its maps
  if zero in ("features", "both"):
    f[0] = 0.0
  weights = jnp.asarray(rng.normal(size=(2, 8)).astype(np.float32))

  def loss(f, a):
    return jnp.sum(bap.bilinear_attention_pool(f, a, 100.0)[1] * weights)

  value, (gf, ga) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(f, a)
  assert np.isfinite(value) and np.all(np.isfinite(gf)) and np.all(np.isfinite(ga))
  part = bap.bilinear_attention_pool(f, a, 100.0)[0]
  np.testing.assert_array_equal(part[0], 0.0)  # a zero image stays zero, not NaN
  np.testing.assert_allclose(np.linalg.norm(part[1].reshape(-1)), 1.0, rtol=1e-6)
  # The other image's gradient is that of the plain formula (NumPy-free check: the
  # same loss on image 1 alone).
  _, (gf1, ga1) = jax.value_and_grad(
      lambda f, a: jnp.sum(bap.bilinear_attention_pool(f, a, 100.0)[1] * weights[1:]),
      argnums=(0, 1))(f[1:], a[1:])
  np.testing.assert_allclose(gf[1:], gf1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ga[1:], ga1, rtol=1e-5, atol=1e-6)


def test_orthogonal_init_gives_orthonormal_filters():
  kernel = bap.orthogonal_kernel_init()(jax.random.key(0), (1, 1, 16, 6))
  k = np.asarray(kernel).reshape(16, 6)
  np.testing.assert_allclose(k.T @ k, np.eye(6), atol=1e-5)
  with pytest.raises(ValueError, match="attention_maps=20 <= the backbone's channels 16"):
    bap.orthogonal_kernel_init()(jax.random.key(0), (1, 1, 16, 20))
  # The network's initial attention conv is that kernel.
  network = nets.build(model_config(attention_orthogonal_init=True, attention_maps=8), 3)
  k = np.asarray(network.init(0, 8)["params"]["attention_maps"]["conv"]["kernel"])[0, 0]
  np.testing.assert_allclose(k.T @ k, np.eye(8), atol=1e-5)


def _centers_ref(centers, f, labels, beta, weights, normalize):
  """NumPy loop: each row adds beta * (f_i - r_y) to its class (repeats accumulate)."""
  ref = centers.copy()
  if normalize:
    norms = np.linalg.norm(centers.reshape(len(centers), -1), axis=1)
    ref = centers / np.maximum(norms, 1e-6)[:, None, None]
  new, loss = centers.copy(), []
  for i, y in enumerate(labels):
    loss.append(((f[i] - ref[y]) ** 2).sum())
    new[y] += beta * weights[i] * (f[i] - ref[y])
  w = np.asarray(weights)
  return new, (np.asarray(loss) * w).sum() / w.sum()


@pytest.mark.parametrize("normalize", [True, False])
def test_attention_center_term_matches_numpy_loop(normalize):
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 3, 5)).astype(np.float32)
  f = rng.normal(size=(6, 3, 5)).astype(np.float32)
  labels = np.array([2, 0, 2, 2, 1, 0], np.int32)   # class 2 three times
  valid = np.array([1, 1, 1, 1, 1, 0], bool)        # the last row is padding
  term = objectives.make("attention_center", weight=1.0, input="part_features",
                         beta=0.05, normalize_center=normalize)
  assert term.init_state(4, (3, 5)).shape == (4, 3, 5)
  loss, new, _ = jax.jit(lambda o, b, s: term(o, b, None, s))(
      {"part_features": f}, {"label": labels, "valid": valid}, centers)
  want_new, want_loss = _centers_ref(centers, f, labels, 0.05, valid.astype(float),
                                     normalize)
  np.testing.assert_allclose(new, want_new, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_array_equal(new[3], centers[3])  # absent class unchanged
  # The pure functions: the per-row loss, and zero centers move by beta * sum f.
  per_row = losses.attention_center_loss(f, labels, centers)
  np.testing.assert_allclose(per_row, ((f - centers[labels]) ** 2).sum((1, 2)), rtol=1e-5)
  zero = losses.update_attention_centers(np.zeros((4, 3, 5), np.float32), f, labels, 0.5)
  np.testing.assert_allclose(zero[2], 0.5 * f[[0, 2, 3]].sum(0), rtol=1e-5)


def test_attention_center_fine_input_joins_the_rows():
  rng = np.random.default_rng(2)
  f, g = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  labels, valid = np.array([0, 1, 0], np.int32), np.ones(3, bool)
  term = objectives.make("attention_center", weight=1.0, input="a", beta=0.1,
                         normalize_center=False, fine_input="b")
  loss, new, _ = term({"a": f, "b": g}, {"label": labels, "valid": valid}, None,
                      np.zeros((2, 2, 4), np.float32))
  np.testing.assert_allclose(loss, (np.sum(f ** 2) + np.sum(g ** 2)) / 6, rtol=1e-5)
  np.testing.assert_allclose(new[0], 0.1 * (f[0] + f[2] + g[0] + g[2]), rtol=1e-5)


@pytest.mark.parametrize("net", ["bap", "bap_impostor"])
def test_bap_networks_outputs_and_head_path(net):
  network = nets.build(model_config(net=net), 5)
  assert "map" in network.reads and network.has_logits == (net == "bap")
  variables = network.init(0, 8)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  out = jax.jit(lambda v, x: network.module.apply(v, x))(variables, x)
  assert out["attention"].shape == (3, 4, 4, 4) and float(out["attention"].min()) >= 0
  assert out["part_features"].shape == (3, 4, 128)
  assert out["features"].shape == (3, 512)
  np.testing.assert_allclose(out["features"], 100.0 * out["part_features"].reshape(3, -1),
                             rtol=1e-5, atol=1e-5)
  assert out["embedding"].shape == (3, 512 if net == "bap" else 16)
  head = network.module.apply(variables, {k: out[k] for k in network.reads}, method="head")
  for k in head:
    np.testing.assert_allclose(head[k], out[k], rtol=1e-5, atol=1e-5)


def test_threshold_boxes_and_drop_known_answers():
  maps = np.zeros((2, 10, 10), np.float32)
  maps[0, 2:4, 5:8] = 1.0          # a block
  maps[0, 6, 1] = 0.3               # below theta 0.5 of the max
  boxes = bap.threshold_boxes(jnp.asarray(maps), jnp.asarray([0.5, 0.5]), 0.1)
  np.testing.assert_allclose(boxes[0], [0.1, 0.4, 0.5, 0.9], atol=1e-6)
  np.testing.assert_allclose(boxes[1], [0.0, 0.0, 1.0, 1.0])  # all-zero map: everything
  images = np.ones((1, 10, 10, 3), np.float32)
  dropped = bap.attention_drop(jnp.asarray(images), jnp.asarray(maps[:1]), 0.5)
  np.testing.assert_array_equal(dropped[0, ..., 0], (maps[0] < 0.5).astype(np.float32))
  # pick_maps draws only maps with mass: map 1 is empty.
  att = np.zeros((2, 3, 3, 2), np.float32)
  att[..., 0] = 1.0
  picked = bap.pick_maps(jax.random.key(0), jnp.asarray(att), 3)
  np.testing.assert_array_equal(picked, np.ones((3, 2, 3, 3)))


def test_crop_drop_training_and_eval_outputs():
  network = nets.build(model_config(attention_crop_drop=True), 5)
  variables = network.init(0, 16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

  @jax.jit
  def run(v, x, key):
    out, _ = network.module.apply(v, x, train=True, mutable=["batch_stats"],
                                  rngs={"augment": key})
    ev = network.module.apply(v, x, train=False)
    return out, ev

  out, ev = run(variables, x, jax.random.key(1))
  for o in (out, ev):
    assert o["crop_logits"].shape == o["drop_logits"].shape == (2, 5)
    assert np.all(np.isfinite(o["crop_logits"])) and np.all(np.isfinite(o["drop_logits"]))
  # Evaluation: the mean of the raw and the test crop's logits (WS-DAN eval).
  raw = network.module.apply(variables, {k: ev[k] for k in network.reads},
                             method="head")["logits"]
  np.testing.assert_allclose(ev["logits"], 0.5 * (raw + ev["crop_logits"]), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("overrides", [{"attention_crop_drop": True}, {}])
def test_xla_engine_serves_bap(overrides):
  network = nets.build(model_config(**overrides), 5)
  variables = network.init(0, 16)
  x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  want = jax.jit(lambda v, x: network.module.apply(v, x))(variables, x)
  got = export.make_cpu_predictor(network.module, variables, 2, outputs=("logits",),
                                  bn_epsilon=network.spec.bn_epsilon, engine="xla",
                                  image_size=16)(x)
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)


def test_config_checks_name_the_field():
  c = small_config("ce", **{"model.net": "bap", "model.attention_maps": 0})
  with pytest.raises(ValueError, match="config.model.attention_maps=0"):
    config_checks.validate(c)
  c = small_config("ce", **{"model.net": "bap", "model.attention_crop_drop": True,
                            "model.trainable": "head", "train.cache_features": True})
  with pytest.raises(ValueError, match="cache_features=True cannot train"):
    config_checks.validate(c)
  with pytest.raises(ValueError, match="needs net 'bap'"):
    nets.build(model_config(net="bap_impostor", attention_crop_drop=True), 3)


def bap_config(**overrides):
  return small_config("ce", steps=6, **{
      "model.net": "bap", "model.attention_maps": 4, "train.batch_size": 32,
      "loss.terms": "ce,attention_center", **overrides})


def test_bap_with_crop_drop_trains_end_to_end(tmp_path):
  config = bap_config(**{"model.attention_crop_drop": True,
                         "loss.terms": "ce,ce_crop,ce_drop,attention_center"})
  results = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for key in ("loss", "ce_crop_loss", "ce_drop_loss", "attention_center_loss"):
    assert all(np.isfinite(r[key]) for r in rows if key in r)
  assert "train_crop_accuracy" in rows[-1]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["steps"] == 6 and np.isfinite(results["splits"]["test"]["softmax"]["top1"])
  assert results["attention_picture"] == "attention.png"
  assert (tmp_path / "attention.png").stat().st_size > 0
  # The centers are training state: (num_classes, M, C).
  _, state = restored(str(tmp_path), config)
  assert state.loss_state["attention_center"].shape == (10, 4, 128)
  assert float(np.abs(state.loss_state["attention_center"]).max()) > 0
  # predict --explain: the heat map is the mean attention map, and every map is drawn.
  model = artifact.Model(str(tmp_path / "artifact"))
  paths = digits_test_files(config, tmp_path, 3)
  out = predict.predict_files(model, paths, batch_size=4, explain_dir=str(tmp_path / "x"))
  assert sorted(os.listdir(tmp_path / "x")) == ["attention_000.png", "explain_000.png"]
  assert (tmp_path / "x" / "attention_000.png").stat().st_size > 2000
  assert [r["attention_maps"] for r in out] == [str(tmp_path / "x" / "attention_000.png")] * 3
  size = model.meta["image_size"]
  looks = model.explain(np.random.default_rng(0).normal(size=(2, size, size, 3)))
  assert looks["attention"].shape[-1] == 4
  np.testing.assert_allclose(looks["heatmap"], looks["attention"].mean(-1), rtol=1e-6)


def test_bap_impostor_head_only_on_cached_features(tmp_path):
  config = bap_config(**{"model.net": "bap_impostor", "loss.terms": "",
                         "model.trainable": "head", "train.cache_features": True})
  config.scheme = "fixed"
  results = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(results["splits"]["test"]["rbf"]["top1"])
  assert pathlib.Path(tmp_path / "results.json").exists()
