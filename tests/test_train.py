"""End-to-end tests of train_and_evaluate on the offline digits data (small CNN)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_loose
from fgjax import train
from fgjax.models import heads
from tests.test_losses import _elope_ref, _means_ref

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(scheme="loose", steps=12, **overrides):
  c = digits_loose.get_config()
  c.scheme = scheme
  c.train.num_steps = steps
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 4
  c.num_devices = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_state(workdir, config):
  trainer = train.Trainer(config, str(workdir))
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          trainer.initial_state(with_impostors=False))
  step = mngr.latest_step()
  return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def test_digits_loose_learns_and_writes_results(tmp_path):
  config = small_config("loose", steps=60)
  results = train.train_and_evaluate(config, str(tmp_path))
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk["steps"] == 60
  # 10 classes: chance is 0.1. 60 steps of a small CNN reach far above it.
  assert results["splits"]["test"]["rbf"]["top1"] > 0.8
  assert results["splits"]["test"]["rbf"]["top5"] >= results["splits"]["test"]["rbf"]["top1"]
  assert results["sigma"] in config.eval.sigma_grid
  assert results["num_impostors"] == 1078  # 60% of 1,797 digits, stratified
  losses = read_losses(tmp_path)
  assert np.mean([losses[s] for s in range(51, 61)]) < np.mean([losses[s] for s in range(1, 11)])
  assert (tmp_path / "tensorboard").is_dir()


@pytest.mark.parametrize("scheme", ["ce", "ce_extra", "tied", "fixed"])
def test_schemes_train(tmp_path, scheme):
  config = small_config(scheme, steps=6, **{"impostors.reset_every_epochs": 1,
                                            "train.num_epochs": 0})
  results = train.train_and_evaluate(config, str(tmp_path))
  test = results["splits"]["test"]
  if scheme.startswith("ce"):
    assert "softmax" in test and "rbf" not in test
  else:
    assert "rbf" in test and "softmax" not in test
  assert all(np.isfinite(v) for v in read_losses(tmp_path).values())


def test_fixed_impostors_stay_fixed_and_loose_move(tmp_path):
  states = {}
  for scheme in ("fixed", "loose"):
    config = small_config(scheme, steps=5)
    trainer = train.Trainer(config, str(tmp_path / scheme))
    initial = trainer.initial_state(with_impostors=True)
    c0 = np.asarray(initial["params"]["impostors"].centers)
    # Protocol step 3: impostors are divided by their mean L2 norm.
    np.testing.assert_allclose(np.linalg.norm(c0, axis=1).mean(), 1.0, rtol=1e-4)
    train.train_and_evaluate(config, str(tmp_path / scheme))
    _, state = final_state(tmp_path / scheme, config)
    states[scheme] = (c0, np.asarray(state["params"]["impostors"].centers))
  np.testing.assert_array_equal(*states["fixed"])
  assert np.abs(states["loose"][0] - states["loose"][1]).max() > 1e-4


def test_tied_reset_sets_impostors_to_embeddings(tmp_path):
  config = small_config("tied", steps=3)
  trainer = train.Trainer(config, str(tmp_path))
  state = trainer.initial_state(with_impostors=True)
  state = trainer.reset_impostors(state)
  variables = {"params": state["params"]["net"], "batch_stats": state["batch_stats"]}
  out = trainer.outputs(variables, trainer.splits.train)
  order = np.argsort(out["index"])
  np.testing.assert_allclose(np.asarray(state["params"]["impostors"].centers),
                             out["embedding"][order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aux", ["none", "elope"])
def test_four_devices_match_one_device(tmp_path, aux):
  assert jax.device_count() >= 4, "conftest forces 4 host devices"
  losses, means = {}, {}
  extra = {"aux_loss.name": aux, "aux_loss.weight": 2.0} if aux != "none" else {}
  for n in (1, 4):
    config = small_config("loose", steps=4, num_devices=n, **extra)
    train.train_and_evaluate(config, str(tmp_path / f"d{n}"))
    losses[n] = read_losses(tmp_path / f"d{n}")
    if aux != "none":
      means[n] = np.asarray(final_state(tmp_path / f"d{n}", config)[1]["class_means"])
  for step in range(1, 5):
    np.testing.assert_allclose(losses[4][step], losses[1][step], rtol=2e-4)
  if aux != "none":  # The class means are state too: the same on 1 and 4 devices.
    assert np.abs(means[1]).max() > 0
    np.testing.assert_allclose(means[4], means[1], rtol=1e-4, atol=1e-6)


def test_head_only_with_cached_features(tmp_path):
  config = small_config("fixed", steps=8, **{"model.trainable": "head",
                                             "train.cache_features": True})
  trainer = train.Trainer(config, str(tmp_path))
  before = trainer.initial_state(with_impostors=True)["params"]["net"]["backbone"]
  train.train_and_evaluate(config, str(tmp_path))
  _, state = final_state(tmp_path, config)
  after = state["params"]["net"]["backbone"]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
  steps = 24
  full = tmp_path / "full"
  train.train_and_evaluate(small_config("loose", steps=steps), str(full))
  _, reference = final_state(full, small_config("loose", steps=steps))

  killed = tmp_path / "killed"
  script = (
      "import sys; sys.path.insert(0, %r)\n"
      "from tests.test_train import small_config\n"
      "from fgjax import train\n"
      "train.train_and_evaluate(small_config('loose', steps=%d, **{'train.checkpoint_every_steps': 2}), %r)\n"
  ) % (str(REPO), steps * 50, str(killed))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:
    done = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
    if done and max(done) >= 6:
      break
    if proc.poll() is not None:
      pytest.fail("training subprocess exited before it could be killed")
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # Resume with the same total as the reference run.
  results = train.train_and_evaluate(small_config("loose", steps=steps), str(killed))
  assert results["steps"] == steps
  step, resumed = final_state(killed, small_config("loose", steps=steps))
  assert step == steps
  for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("scheme", "bogus", "config.scheme"),
    ("model.backbone", "nope", "config.model.backbone"),
    ("impostors.sigma", 0.0, "config.impostors.sigma"),
    ("model.trainable", "last:x", "config.model.trainable"),
    ("eval.sigma_grid", (0.1, -1.0), "config.eval.sigma_grid"),
    ("input.image_size", 300, "config.input.image_size"),
])
def test_bad_config_fails_before_compute(tmp_path, field, value, match):
  config = small_config(**{field: value})
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"aux_loss.name": "triplet", "aux_loss.weight": 1.0}, "config.aux_loss.name"),
    ({"aux_loss.name": "elope", "aux_loss.weight": -1.0}, "config.aux_loss.weight"),
    ({"aux_loss.name": "elope", "aux_loss.weight": 1.0, "aux_loss.alpha": -0.5},
     "config.aux_loss.alpha"),
    ({"aux_loss.name": "elope", "aux_loss.weight": 1.0, "aux_loss.gamma": -1.0},
     "config.aux_loss.gamma"),
    ({"aux_loss.name": "elope", "aux_loss.weight": 1.0, "aux_loss.margin": -1.0},
     "config.aux_loss.margin"),
    # A loss without a weight, or a weight without a loss: an error, not a no-op.
    ({"aux_loss.name": "center", "aux_loss.weight": 0.0}, "config.aux_loss.weight=0"),
    ({"aux_loss.weight": 2.0}, "config.aux_loss.name='none'"),
])
def test_bad_aux_loss_config_fails_before_compute(tmp_path, overrides, match):
  config = small_config(**overrides)
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def aux_config(scheme="ce_extra", name="elope", steps=6, **overrides):
  return small_config(scheme, steps=steps, **{"aux_loss.name": name,
                                              "aux_loss.weight": 2.0, **overrides})


@pytest.mark.parametrize("scheme,name,overrides", [
    ("ce_extra", "elope", {}),
    ("loose", "center", {}),
    ("fixed", "elope", {"model.trainable": "head", "train.cache_features": True}),
])
def test_aux_loss_trains_and_checkpoints_class_means(tmp_path, scheme, name, overrides):
  config = aux_config(scheme, name, **overrides)
  train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  aux = [r["aux_loss"] for r in rows if "aux_loss" in r]
  assert len(aux) == 6 and np.all(np.isfinite(aux)) and max(aux) > 0
  assert all(np.isfinite(v) for v in read_losses(tmp_path).values())
  step, state = final_state(tmp_path, config)
  means = np.asarray(state["class_means"])
  assert step == 6 and means.shape == (10, 64)  # (C, E): 10 digits, d_em = 64
  assert np.abs(means).max() > 1e-3  # moved away from their zero init


def test_no_aux_loss_no_class_means(tmp_path):
  trainer = train.Trainer(small_config("ce_extra"), str(tmp_path))
  assert "class_means" not in trainer.initial_state(with_impostors=False)


@pytest.mark.parametrize("name", ["center", "elope"])
def test_aux_update_matches_numpy_and_ignores_padding(tmp_path, name):
  # Head-only on cached features: each row's embedding depends on that row alone (no
  # BatchNorm over the batch), so the padding row can only leak through the aux loss.
  config = aux_config("ce_extra", name, **{
      "model.trainable": "head", "train.cache_features": True, "aux_loss.weight": 0.7,
      "aux_loss.alpha": 0.3, "aux_loss.gamma": 2.0, "aux_loss.margin": 1.5})
  trainer = train.Trainer(config, str(tmp_path))
  state = trainer.initial_state(with_impostors=True)
  rng = np.random.default_rng(0)
  means0 = (0.3 * rng.normal(size=state["class_means"].shape)).astype(np.float32)
  state["class_means"] = jnp.asarray(means0)
  features, _ = trainer.train_features()
  # Row 5 is padding; its class 7 appears nowhere else in the batch.
  labels = np.array([0, 2, 2, 5, 0, 7], np.int32)
  batch = {"image": features[:6], "label": labels, "index": np.arange(6, dtype=np.int32),
           "valid": np.array([True] * 5 + [False])}
  update = jax.jit(train.make_update_fn(
      trainer.net, trainer.scheme, trainer.tx, float(config.impostors.sigma),
      backbone_train=False, from_features=True, aux=trainer.aux))
  new_state, metrics = update(state, batch)

  out = trainer.net.apply({"params": state["params"]["net"]}, features[:5],
                          method=heads.ImpostorNet.heads)
  emb = np.asarray(out["embedding"], np.float64)
  f = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # aux_loss.normalize
  if name == "center":
    want = np.mean(0.5 * ((f - means0[labels[:5]]) ** 2).sum(1))
    want_means = _means_ref(means0, f, labels[:5], 0.3)
  else:
    want, want_means = _elope_ref(f, labels[:5], means0, 0.3, 2.0, 1.5)
  np.testing.assert_allclose(metrics["aux_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(new_state["class_means"], want_means, rtol=1e-5, atol=1e-6)
  logits = np.asarray(out["logits"], np.float64)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  ce = np.mean(lse - logits[np.arange(5), labels[:5]])
  np.testing.assert_allclose(metrics["loss"], ce + 0.7 * want, rtol=1e-5)

  # Another image and label in the padding row: the same step, to the last bit.
  other = dict(batch, image=features[[0, 1, 2, 3, 4, 100]],
               label=np.array([0, 2, 2, 5, 0, 9], np.int32))
  new_other, metrics_other = update(state, other)
  for a, b in zip(jax.tree.leaves((new_state, metrics)),
                  jax.tree.leaves((new_other, metrics_other))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_aux_loss_resume_matches_uninterrupted_run(tmp_path):
  trainer = train.Trainer(aux_config(), str(tmp_path / "shapes"))
  real = trainer.initial_state(with_impostors=True)
  abstract = trainer.initial_state(with_impostors=False)
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(real)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(abstract)]
  train.train_and_evaluate(aux_config(steps=6), str(tmp_path / "full"))
  train.train_and_evaluate(aux_config(steps=4), str(tmp_path / "part"))
  results = train.train_and_evaluate(aux_config(steps=6), str(tmp_path / "part"))
  assert results["steps"] == 6
  # Resumed at step 4, not restarted: steps 1-4 are logged once.
  rows = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  _, reference = final_state(tmp_path / "full", aux_config(steps=6))
  _, resumed = final_state(tmp_path / "part", aux_config(steps=6))
  for key in ("class_means", "params"):
    for a, b in zip(jax.tree.leaves(reference[key]), jax.tree.leaves(resumed[key])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_devices(tmp_path):
  config = small_config(num_devices=4, **{"train.batch_size": 30})
  with pytest.raises(ValueError, match=r"config\.train\.batch_size"):
    train.train_and_evaluate(config, str(tmp_path))


def test_fixed_trains_against_pq_compressed_impostors(tmp_path):
  from fgjax import artifact, quantize
  config = small_config("fixed", steps=4, **{"impostors.pq_bytes": 8})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["pq_applied"] == "before training"
  assert results["memory"]["pq"]["codes"] == 1078 * 8
  _, state = final_state(tmp_path, config)
  pq = quantize.ProductQuantizer(**{k: np.asarray(v) for k, v in state["pq"].items()})
  centers = np.asarray(state["params"]["impostors"].centers)
  # The frozen impostors are already points of the codebook: re-quantising is exact.
  np.testing.assert_allclose(np.asarray(quantize.reconstruct(pq, centers)), centers,
                             atol=1e-5)
  model = artifact.Model(str(tmp_path / "artifact"))
  assert model.codes.shape == (1078, 8) and model.codes.dtype == np.uint8
  images = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
  adc = model.log_probs(images)
  emb = model._forward(model.variables, images)["embedding"]
  from fgjax import impostors
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
  """trainable='last:1': no gradient flows into frozen stages, and none is computed."""
  def grad_fn_and_params(trainable):
    config = small_config("ce", steps=1, **{"model.trainable": trainable})
    trainer = train.Trainer(config, str(tmp_path / trainable.replace(":", "")))
    params = trainer.initial_state(with_impostors=False)["params"]["net"]
    stats = trainer._variables0.get("batch_stats", {})  # pylint: disable=protected-access
    x = jnp.ones((4, 8, 8, 3), jnp.float32)

    def loss(p):
      variables = {"params": train._stop_frozen(p, trainer.frozen)}  # pylint: disable=protected-access
      if stats:
        variables["batch_stats"] = stats
      return jnp.sum(trainer.net.apply(variables, x, train=False)["logits"] ** 2)
    return jax.grad(loss), params

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
