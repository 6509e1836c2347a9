"""End-to-end tests of train_and_evaluate on the offline digits data (small CNN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import birds_fixed
from fgjax import artifact
from fgjax import data
from fgjax import impostors
from fgjax import parallel
from fgjax import quantize
from fgjax import train
from fgjax import update as update_lib
from tests.test_losses import _elope_ref, _means_ref
from tests.train_helpers import aux_config
from tests.train_helpers import read_json
from tests.train_helpers import read_losses
from tests.train_helpers import read_rows
from tests.train_helpers import restored
from tests.train_helpers import small_config


def test_digits_loose_learns_and_writes_results(tmp_path):
  config = small_config("loose", steps=60)
  results = train.train_and_evaluate(config, str(tmp_path))
  on_disk = read_json(tmp_path / "results.json")
  assert on_disk["steps"] == 60
  # 10 classes: chance is 0.1. 60 steps of a small CNN reach far above it.
  assert results["splits"]["test"]["rbf"]["top1"] > 0.8
  assert results["splits"]["test"]["rbf"]["top5"] >= results["splits"]["test"]["rbf"]["top1"]
  assert results["sigma"] in config.eval.sigma_grid
  assert results["num_impostors"] == 1078  # 60% of 1,797 digits, stratified
  losses = read_losses(tmp_path)
  assert np.mean([losses[s] for s in range(51, 61)]) < np.mean([losses[s] for s in range(1, 11)])
  assert (tmp_path / "tensorboard").is_dir()
  # Per-image predictions for paired tests between runs, matching the reported top-1.
  preds = np.load(tmp_path / train.PREDICTIONS_FILE)
  assert set(preds.files) == {"val_label", "val_rbf", "test_label", "test_rbf"}
  assert np.mean(preds["test_rbf"] == preds["test_label"]) == pytest.approx(
      results["splits"]["test"]["rbf"]["top1"])


@pytest.mark.parametrize("scheme", ["ce", "ce_extra", "tied", "fixed"])
def test_schemes_train(tmp_path, scheme):
  config = small_config(scheme, steps=6, **{"impostors.reset_every_epochs": 1,
                                            "train.num_epochs": 0})
  results = train.train_and_evaluate(config, str(tmp_path))
  test = results["splits"]["test"]
  head = "softmax" if scheme.startswith("ce") else "rbf"
  assert set(test) & {"softmax", "rbf"} == {head}
  preds = np.load(tmp_path / train.PREDICTIONS_FILE)
  assert np.mean(preds[f"test_{head}"] == preds["test_label"]) == pytest.approx(
      test[head]["top1"])
  assert all(np.isfinite(v) for v in read_losses(tmp_path).values())


def test_fixed_impostors_stay_fixed_and_loose_move(tmp_path):
  states = {}
  for scheme in ("fixed", "loose"):
    config = small_config(scheme, steps=5)
    initial = train.Run(config).initial_state()
    c0 = np.asarray(initial.impostors.centers)
    # Protocol step 3: impostors are divided by their mean L2 norm.
    np.testing.assert_allclose(np.linalg.norm(c0, axis=1).mean(), 1.0, rtol=1e-4)
    train.train_and_evaluate(config, str(tmp_path / scheme))
    _, state = restored(tmp_path / scheme, config)
    states[scheme] = (c0, np.asarray(state.impostors.centers))
  np.testing.assert_array_equal(*states["fixed"])
  assert np.abs(states["loose"][0] - states["loose"][1]).max() > 1e-4


def test_tied_reset_sets_impostors_to_embeddings(tmp_path):
  config = small_config("tied", steps=40, **{"impostors.reset_every_epochs": 1})
  run = train.Run(config)
  assert run.steps_per_epoch == 16  # 1,078 training digits / 64
  state = run.initial_state()
  # Move the network away from the initial one, so a reset is visible.
  moved = jax.tree.map(lambda p: p * 1.5, state.params["net"])
  state = state.replace(params={**state.params, "net": moved})
  before = np.asarray(state.impostors.centers)
  context = run.policy_context()
  for step in (1, 15, 40):  # not a reset step, not a reset step, the last step
    assert run.policy.after_step(state, step, context) is state
  reset = run.policy.after_step(state, 16, context)
  emb, labels = run.outputs.train_embeddings(state.variables())
  np.testing.assert_allclose(np.asarray(reset.impostors.centers), emb, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(reset.impostors.labels), labels)
  assert np.abs(emb - before).max() > 1e-3


@pytest.mark.parametrize("aux", ["", "elope"])
def test_four_devices_match_one_device(tmp_path, aux):
  assert jax.device_count() >= 4, "conftest forces 4 host devices"
  losses, means = {}, {}
  for n in (1, 4):
    config = small_config("loose", steps=4, num_devices=n, **{"loss.extra_terms": aux})
    train.train_and_evaluate(config, str(tmp_path / f"d{n}"))
    losses[n] = read_losses(tmp_path / f"d{n}")
    if aux:
      means[n] = np.asarray(restored(tmp_path / f"d{n}", config)[1].loss_state[aux])
  for step in range(1, 5):
    np.testing.assert_allclose(losses[4][step], losses[1][step], rtol=2e-4)
  if aux:  # The class means are state too: the same on 1 and 4 devices.
    assert np.abs(means[1]).max() > 0
    np.testing.assert_allclose(means[4], means[1], rtol=1e-4, atol=1e-6)


def test_head_only_with_cached_features(tmp_path):
  config = small_config("fixed", steps=8, **{"model.trainable": "head",
                                             "train.cache_features": True})
  before = train.Run(config).initial_state().params["net"]["backbone"]
  train.train_and_evaluate(config, str(tmp_path))
  _, state = restored(tmp_path, config)
  after = state.params["net"]["backbone"]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field,value,match", [
    ("scheme", "bogus", "config.scheme"),
    ("model.backbone", "nope", "config.model.backbone"),
    ("model.net", "resnext", "config.model.net"),
    ("model.pooling", "median", "config.model.pooling"),
    ("loss.nca.sigma", 0.0, "config.loss.nca.sigma"),
    ("model.trainable", "last:x", "config.model.trainable"),
    ("eval.sigma_grid", (0.1, -1.0), "config.eval.sigma_grid"),
    ("input.image_size", 300, "config.input.image_size"),
    ("optim.schedule", "foo", "config.optim.schedule"),
    ("impostors.policy", "sticky", "config.impostors.policy"),
    ("model.pooling_k", 0, "config.model.pooling_k=0 must be > 0"),
    ("model.localizer_tau", 1.5, r"config.model.localizer_tau=1.5 must lie in \[0, 1\]"),
    ("optim.final_lr_fraction", float("nan"), "config.optim.final_lr_fraction=nan"),
    ("optim.grad_clip_norm", -1.0, "config.optim.grad_clip_norm=-1.0 must be >= 0"),
    ("eval.k", 0, "config.eval.k=0"),
    ("train.max_embedding_norm", -1.0, "config.train.max_embedding_norm"),
])
def test_bad_config_fails_before_compute(tmp_path, field, value, match):
  config = small_config(**{field: value})
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"loss.extra_terms": "triplet"}, "config.loss.extra_terms"),
    ({"loss.terms": "nca,focal"}, "config.loss.terms"),
    ({"loss.extra_terms": "elope", "loss.elope.weight": -1.0}, "config.loss.elope.weight"),
    ({"loss.extra_terms": "elope", "loss.elope.alpha": -0.5}, "config.loss.elope.alpha"),
    ({"loss.extra_terms": "elope", "loss.elope.gamma": -1.0}, "config.loss.elope.gamma"),
    ({"loss.extra_terms": "elope", "loss.elope.margin": -1.0}, "config.loss.elope.margin"),
    # A term in the loss with weight 0 is a silent no-op: an error.
    ({"loss.extra_terms": "center", "loss.center.weight": 0.0}, "config.loss.center.weight"),
    # Terms the network cannot feed, or that need impostors the policy lacks.
    ({"loss.terms": "ce"}, "config.loss.ce.input='logits' is not an output"),
    ({"scheme": "ce", "loss.terms": "nca"}, "need impostors"),
])
def test_bad_loss_config_fails_before_compute(tmp_path, overrides, match):
  config = small_config(**overrides)
  with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_moved_config_field_is_named(tmp_path):
  config = small_config()
  config.impostors.sigma = 0.3  # The pre-loss-terms name of config.loss.nca.sigma.
  with pytest.raises(ValueError, match=r"config\.impostors\.sigma .*config\.loss\.nca\.sigma"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("scheme,name,overrides", [
    ("ce_extra", "elope", {}),
    ("loose", "center", {}),
    ("fixed", "elope", {"model.trainable": "head", "train.cache_features": True}),
])
def test_aux_loss_trains_and_checkpoints_class_means(tmp_path, scheme, name, overrides):
  config = aux_config(scheme, name, **overrides)
  train.train_and_evaluate(config, str(tmp_path))
  rows = read_rows(tmp_path)
  aux = [r[f"{name}_loss"] for r in rows if f"{name}_loss" in r]
  assert len(aux) == 6 and np.all(np.isfinite(aux)) and max(aux) > 0
  assert all(np.isfinite(v) for v in read_losses(tmp_path).values())
  step, state = restored(tmp_path, config)
  means = np.asarray(state.loss_state[name])
  assert step == 6 and means.shape == (10, 64)  # (C, E): 10 digits, d_em = 64
  assert np.abs(means).max() > 1e-3  # moved away from their zero init


def test_no_class_mean_term_no_loss_state(tmp_path):
  assert train.Run(small_config("ce_extra")).initial_state().loss_state == {}


@pytest.mark.parametrize("name", ["center", "elope"])
def test_aux_update_matches_numpy_and_ignores_padding(tmp_path, name):
  # Head-only on cached features: each row's embedding depends on that row alone (no
  # BatchNorm over the batch), so the padding row can only leak through the aux loss.
  config = aux_config("ce_extra", name, **{
      "model.trainable": "head", "train.cache_features": True,
      f"loss.{name}.weight": 0.7, f"loss.{name}.alpha": 0.3})
  if name == "elope":
    config.loss.elope.gamma, config.loss.elope.margin = 2.0, 1.5
  run = train.Run(config)
  state = run.initial_state()
  rng = np.random.default_rng(0)
  means0 = (0.3 * rng.normal(size=state.loss_state[name].shape)).astype(np.float32)
  state = state.replace(loss_state={name: jnp.asarray(means0)})
  features = run.outputs.backbone_features("train")["pooled"]
  # Row 5 is padding; its class 7 appears nowhere else in the batch.
  labels = np.array([0, 2, 2, 5, 0, 7], np.int32)
  batch = {"backbone": {"pooled": features[:6]}, "label": labels,
           "index": np.arange(6, dtype=np.int32),
           "valid": np.array([True] * 5 + [False])}
  update = jax.jit(update_lib.make_update(run.network, run.objective, run.tx,
                                          frozen=run.frozen, forward="heads"))
  new_state, metrics = update(state, batch)

  out = run.network.module.apply(state.variables(), {"pooled": features[:5]},
                                 method="head")
  emb = np.asarray(out["embedding"], np.float64)
  f = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # loss.<name>.normalize
  if name == "center":
    want = np.mean(0.5 * ((f - means0[labels[:5]]) ** 2).sum(1))
    want_means = _means_ref(means0, f, labels[:5], 0.3)
  else:
    want, want_means = _elope_ref(f, labels[:5], means0, 0.3, 2.0, 1.5)
  np.testing.assert_allclose(metrics[f"{name}_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(new_state.loss_state[name], want_means, rtol=1e-5, atol=1e-6)
  logits = np.asarray(out["logits"], np.float64)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  ce = np.mean(lse - logits[np.arange(5), labels[:5]])
  np.testing.assert_allclose(metrics["ce_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ce + 0.7 * want, rtol=1e-5)

  # Another image and label in the padding row: the same step, to the last bit.
  other = dict(batch, backbone={"pooled": features[[0, 1, 2, 3, 4, 100]]},
               label=np.array([0, 2, 2, 5, 0, 9], np.int32))
  new_other, metrics_other = update(state, other)
  for a, b in zip(jax.tree.leaves((new_state, metrics)),
                  jax.tree.leaves((new_other, metrics_other))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_donated_state_leaves_backbone_variables_alive(tmp_path):
  run = train.Run(small_config("fixed", steps=1))
  state = run.initial_state()
  update = run.make_update()
  batch = next(run.outputs.train_batches(0))
  update(state, parallel.global_batch(batch, run.mesh))
  # The registry's (pretrained) backbone arrays are still readable: the state owned
  # copies of them, and only those were donated.
  for leaf in jax.tree.leaves(run.network.spec.variables):
    assert not leaf.is_deleted()
    np.asarray(leaf)


def test_batch_not_divisible_by_devices(tmp_path):
  config = small_config(num_devices=4, **{"train.batch_size": 30})
  with pytest.raises(ValueError, match=r"config\.train\.batch_size"):
    train.train_and_evaluate(config, str(tmp_path))


def test_fixed_trains_against_pq_compressed_impostors(tmp_path):
  config = small_config("fixed", steps=4, **{"impostors.pq_bytes": 8})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["pq_applied"] == "before training"
  assert results["memory"]["pq"]["codes"] == 1078 * 8
  _, state = restored(tmp_path, config)
  pq = quantize.ProductQuantizer(**{k: np.asarray(v)
                                    for k, v in state.impostor_state["pq"].items()})
  centers = np.asarray(state.impostors.centers)
  # The frozen impostors are already points of the codebook: re-quantising is exact.
  np.testing.assert_allclose(np.asarray(quantize.reconstruct(pq, centers)), centers,
                             atol=1e-5)
  model = artifact.Model(str(tmp_path / "artifact"))
  assert model.codes.shape == (1078, 8) and model.codes.dtype == np.uint8
  images = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
  adc = model.log_probs(images)
  emb = model.forward(images)["embedding"]
  exact = impostors.rbf_log_probs(emb, impostors.ImpostorSet(centers, model.impostors.labels),
                                  model.sigma, num_classes=10)
  np.testing.assert_allclose(np.exp(adc), np.exp(np.asarray(exact)), atol=1e-4)


def test_openset_report_with_holdout_classes(tmp_path):
  config = small_config("fixed", steps=10, **{"data.holdout_classes": (8, 9)})
  results = train.train_and_evaluate(config, str(tmp_path))
  report = results["openset"]
  assert results["num_classes"] == 8
  assert report["num_unknown"] > 50 and report["num_known"] > 200
  assert 0.0 <= report["ks"] <= 1.0 and 0.0 <= report["auroc"] <= 1.0
  saved = np.load(tmp_path / "openset_entropy.npz")
  assert len(saved["unknown"]) == report["num_unknown"]
  # Entropies live in [0, log C].
  assert saved["known"].min() >= -1e-6 and saved["known"].max() <= np.log(8) + 1e-6
  assert (tmp_path / "openset_entropy.png").stat().st_size > 1000


def test_frozen_stages_are_left_out_of_the_backward_pass(tmp_path):
  """trainable='last:1': no gradient flows into frozen blocks, and none is computed."""
  def grad_fn_and_params(trainable):
    run = train.Run(small_config("ce", steps=1, **{"model.trainable": trainable}))
    variables = run.network.init(0, 8)
    x = jnp.ones((4, 8, 8, 3), jnp.float32)

    def loss(p):
      v = {**variables, "params": update_lib.stop_frozen(p, run.frozen)}
      return jnp.sum(run.network.module.apply(v, x, train=False)["logits"] ** 2)
    return jax.grad(loss), variables["params"]

  grad, params = grad_fn_and_params("last:1")
  g = grad(params)
  for stage in ("stage0", "stage1"):
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g["backbone"][stage]))
  assert max(float(jnp.abs(v).max()) for v in jax.tree.leaves(g["backbone"]["stage2"])) > 0

  def convs(fn, p):
    return str(jax.make_jaxpr(fn)(p)).count("conv_general_dilated")
  full_grad, full_params = grad_fn_and_params("all")
  # Forward convs are the same; the backward of the two frozen stages is gone.
  assert convs(grad, params) < convs(full_grad, full_params)


def test_cub_config_trains_under_tfds_mock_data(tmp_path):
  # configs/birds_fixed.py end to end on TFDS's mock records (no data, no download);
  # small images, random SqueezeNet weights (the torchvision file is not here).
  tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS sources need it")
  config = birds_fixed.get_config()
  config.model.pretrained = False
  config.input.image_size, config.input.resize_size = 32, 36
  config.train.batch_size, config.eval.batch_size = 4, 4
  config.train.num_steps, config.train.log_every_steps = 3, 1
  config.num_devices = 1
  config.data.holdout_classes = (0,)
  with tfds.testing.mock_data(num_examples=24):
    splits = data.get_splits(config.data)
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results["steps"] == 3 and results["num_classes"] == 199
  # One impostor per training record: 24 mock records less the 10% carved as val and
  # those of the held-out class 0.
  assert results["num_impostors"] == len(splits.train) <= 22
  assert set(results["splits"]) == {"val", "test"}
  assert 0.0 <= results["splits"]["test"]["rbf"]["top1"] <= 1.0
  assert all(np.isfinite(v) for v in read_losses(tmp_path).values())


def test_frozen_groups_do_not_train(tmp_path):
  config = small_config("ce_extra", steps=3, **{"model.frozen": "embed"})
  before = train.Run(config).initial_state().params["net"]
  train.train_and_evaluate(config, str(tmp_path))
  _, state = restored(tmp_path, config)
  after = state.params["net"]
  jax.tree.map(np.testing.assert_array_equal, after["embed"], before["embed"])
  assert np.abs(np.asarray(after["classifier"]["kernel"]) -
                np.asarray(before["classifier"]["kernel"])).max() > 0
  with pytest.raises(ValueError, match=r"config\.model\.frozen names \['localizer'\]"):
    train.Run(small_config("ce_extra", **{"model.frozen": "localizer"}))
