"""Coarse2Fine (fgjax.models.coarse2fine): up-sampler and its pre-training, the masked
fine pass, the gradient path through the up-sampler, inference modes, training."""

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from fgjax import config_checks
from fgjax import export
from fgjax import train
from fgjax.models import coarse2fine as c2f
from fgjax.models import nets
from tests.train_helpers import small_config


def model_config(**overrides):
  c = common.get_config().model
  c.update(dict(backbone="small_cnn", pretrained=False, net="c2f", attention_maps=3,
                upsampler_width=4))
  c.update(overrides)
  return c


def test_synthetic_pairs_are_interpolations_of_their_maps():
  low, high = c2f.synthetic_pairs(jax.random.key(0), jnp.arange(6), (4, 4), (12, 12))
  assert low.shape == (6, 4, 4) and high.shape == (6, 12, 12)
  np.testing.assert_allclose(low.max((1, 2)), 1.0, rtol=1e-6)
  assert float(low.min()) >= 0
  for lo, hi in zip(np.asarray(low), np.asarray(high)):
    errors = [np.abs(np.asarray(jax.image.resize(lo, (12, 12), m)) - hi).max()
              for m in c2f.INTERPOLATIONS]
    assert min(errors) < 1e-6
  again = c2f.synthetic_pairs(jax.random.key(0), jnp.asarray([3]), (4, 4), (12, 12))
  np.testing.assert_array_equal(again[1][0], high[3])  # pair i depends on (key, i) only


@pytest.mark.parametrize("c_in,size", [(1, 3), (3, 5)])
def test_deconv2x_is_flax_conv_transpose(c_in, size):
  """Same parameter tree, values and gradients as the op it replaces (so checkpoints
  of either restore into the other)."""
  ref = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding="SAME")
  ours = c2f.Deconv2x(4)
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, c_in))
  params = ref.init(jax.random.key(1), x)["params"]
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)["params"]) == \
      jax.tree.map(jnp.shape, params)
  params = {**params, "bias": jnp.arange(4.0)}
  y = ours.apply({"params": params}, x)
  assert y.shape == (2, 2 * size, 2 * size + 2, 4)
  np.testing.assert_allclose(y, ref.apply({"params": params}, x), atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)))  # noqa: E731
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x))):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_pretraining_lowers_the_l2_loss():
  net = c2f.Upsampler(4)
  params = net.init(jax.random.key(0), jnp.zeros((1, 4, 4)), (16, 16))["params"]
  y = net.apply({"params": params}, jnp.zeros((2, 4, 4)), (16, 16))
  assert y.shape == (2, 16, 16)
  trained, losses = jax.jit(lambda p: c2f.pretrain_upsampler(
      net, p, jax.random.key(1), (4, 4), (16, 16), num_pairs=256, epochs=6,
      batch_size=32, learning_rate=3e-3))(params)
  losses = np.asarray(losses)
  assert losses.shape == (6,) and losses[-1] < 0.5 * losses[0]


def test_unit_range_and_average_predictions():
  u = jax.random.normal(jax.random.key(0), (3, 5, 5))
  r = c2f.unit_range(u)
  np.testing.assert_allclose(r.min((1, 2)), 0.0, atol=1e-7)
  np.testing.assert_allclose(r.max((1, 2)), 1.0, rtol=1e-6)
  a, b = jax.random.normal(jax.random.key(1), (2, 4, 7)) * 5
  want = np.log(0.5 * (jax.nn.softmax(a) + jax.nn.softmax(b)))
  np.testing.assert_allclose(c2f.average_predictions(a, b), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def built():
  network = nets.build(model_config(upsampler_pretrain_pairs=32), 5)
  return network, network.init(0, 16)


def test_outputs_modes_and_deterministic_eval(built):
  network, variables = built
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  outs = {}
  for mode in c2f.MODES:
    module = network.module.clone(mode=mode)
    outs[mode] = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
  o = outs["average"]
  assert o["mask"].shape == (2, 16, 16) and o["fine_part_features"].shape == (2, 3, 128)
  np.testing.assert_allclose(o["mask"].min((1, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(outs["coarse"]["logits"], o["coarse_logits"], rtol=1e-6)
  np.testing.assert_allclose(outs["fine"]["logits"], o["fine_logits"], rtol=1e-6)
  np.testing.assert_allclose(
      o["logits"], c2f.average_predictions(o["coarse_logits"], o["fine_logits"]),
      rtol=1e-5, atol=1e-6)
  # Evaluation masks with the mean map (no rng); the XLA engine serves every mode.
  for mode in c2f.MODES:
    module = network.module.clone(mode=mode)
    got = export.make_cpu_predictor(module, variables, 2, outputs=("logits",),
                                    bn_epsilon=network.spec.bn_epsilon, engine="xla",
                                    image_size=16)(np.asarray(x))
    np.testing.assert_allclose(got["logits"], outs[mode]["logits"], rtol=1e-4, atol=1e-4)


def test_training_masks_with_one_random_map_per_image(built):
  network, variables = built

  @jax.jit
  def masks(v, x, key):
    out, _ = network.module.apply(v, x, train=True, mutable=["batch_stats"],
                                  rngs={"augment": key})
    return out["mask"], out["attention"]

  x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  m1, att = masks(variables, x, jax.random.key(0))
  m2, _ = masks(variables, x, jax.random.key(0))
  np.testing.assert_array_equal(m1, m2)  # the 'augment' key decides
  up = c2f.PretrainedUpsampler(4, parent=None)
  params = {"params": variables["params"]["upsampler"]}
  # Each image's mask is the up-sampled, normalised version of one of its M maps.
  candidates = np.stack([c2f.unit_range(up.apply(params, att[..., m], (16, 16)))
                         for m in range(3)], axis=1)  # (N, M, S, S)
  errors = np.abs(candidates - np.asarray(m1)[:, None]).max((2, 3))
  assert np.all(errors.min(1) < 1e-5), errors
  m3, _ = masks(variables, x, jax.random.key(5))
  assert np.abs(np.asarray(m3) - np.asarray(m1)).max() > 0  # another key, other maps


def test_fine_loss_reaches_attention_through_the_upsampler(built):
  network, variables = built
  with jax.enable_x64(True):
    module = network.module.clone(backbone=network.module.backbone.clone(
        dtype=jnp.float64))
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3), jnp.float64)
    labels = jnp.asarray([1, 3])

    def fine_loss(params, frozen_mask=False):
      def stop(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        hit = frozen_mask and isinstance(context.module, c2f.PretrainedUpsampler)
        return jax.lax.stop_gradient(y) if hit else y
      with nn.intercept_methods(stop):
        out = module.apply({**v64, "params": params}, x, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(
          out["fine_logits"], labels).mean()

    params = v64["params"]
    grads = jax.jit(jax.grad(fine_loss))(params)
    frozen = jax.jit(jax.grad(lambda p: fine_loss(p, frozen_mask=True)))(params)
    for group in ("upsampler", "attention_maps"):
      leaves = jax.tree.leaves(grads[group])
      assert max(float(jnp.abs(g).max()) for g in leaves) > 0, group
      # Central differences along a random direction of the group.
      keys = jax.random.split(jax.random.key(4), len(leaves))
      flat, tree = jax.tree.flatten(params[group])
      direction = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, jnp.float64)
                                            for k, a in zip(keys, flat)])
      eps = 1e-5
      shift = lambda s: {**params, group: jax.tree.map(  # noqa: E731
          lambda p, d: p + s * d, params[group], direction)}
      numeric = (fine_loss(shift(eps)) - fine_loss(shift(-eps))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(
          jax.tree.leaves(grads[group]), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)
    # Without the mask path the up-sampler gets nothing and the attention less.
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(frozen["upsampler"]))
    diff = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), grads["attention_maps"],
                        frozen["attention_maps"])
    assert max(float(d) for d in jax.tree.leaves(diff)) > 1e-8


def test_config_checks():
  with pytest.raises(ValueError, match="c2f_mode='best'"):
    nets.build(model_config(c2f_mode="best"), 3)
  c = small_config("ce", **{"model.net": "c2f", "model.trainable": "head",
                            "train.cache_features": True})
  with pytest.raises(ValueError, match="net 'c2f' .*cache_features=False"):
    config_checks.validate(c)
  c = small_config("ce", **{"model.net": "c2f", "model.c2f_mode": "best"})
  with pytest.raises(ValueError, match="config.model.c2f_mode='best' is unknown"):
    config_checks.validate(c)


def test_c2f_trains_end_to_end(tmp_path):
  config = small_config("ce", steps=5, **{
      "model.net": "c2f", "model.attention_maps": 3, "model.upsampler_width": 4,
      "model.upsampler_pretrain_pairs": 64, "model.attention_orthogonal_init": True,
      "input.image_size": 8, "train.batch_size": 32,
      "loss.terms": "ce,ce_fine,attention_center", "loss.ce.input": "coarse_logits",
      "loss.attention_center.fine_input": "fine_part_features",
      "eval.extra_logits": ("coarse_logits", "fine_logits")})
  results = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for key in ("loss", "ce_loss", "ce_fine_loss", "attention_center_loss"):
    assert all(np.isfinite(r[key]) for r in rows if key in r), key
  assert "train_fine_accuracy" in rows[-1]
  assert json.loads((tmp_path / "results.json").read_text())["steps"] == 5
  assert np.isfinite(results["splits"]["test"]["softmax"]["top1"])
  assert (tmp_path / "attention.png").exists()
  # All three inference modes from one evaluation: 'logits' is the average.
  with np.load(tmp_path / train.PREDICTIONS_FILE) as p:
    for head in ("coarse_logits", "fine_logits"):
      got = results["splits"]["test"]["heads"][head]["top1"]
      assert got == pytest.approx(np.mean(p[f"test_{head}"] == p["test_label"]))
  config.eval.extra_logits = ("coarse_logits", "fine_logts")
  with pytest.raises(ValueError, match=r"config.eval.extra_logits names \['fine_logts'\]"):
    train.Run(config)


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
                    reason="the ONNX engine needs onnx and onnxruntime")
def test_onnx_serves_every_c2f_mode_and_bap(built):
  network, variables = built
  x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  predictor = lambda module, v: export.make_cpu_predictor(  # noqa: E731
      module, v, 2, outputs=("logits",), bn_epsilon=network.spec.bn_epsilon,
      engine="onnx", image_size=16)
  coarse = network.module.clone(mode="coarse")
  want = jax.jit(lambda v, x: coarse.apply(v, x))(variables, x)["logits"]
  np.testing.assert_allclose(predictor(coarse, variables)(x)["logits"], want,
                             rtol=1e-4, atol=1e-4)
  # WS-DAN's test-time crop (net 'bap') translates too.
  bap_net = nets.build(model_config(net="bap", attention_crop_drop=True), 5)
  bap_vars = bap_net.init(0, 16)
  want = jax.jit(lambda v, x: bap_net.module.apply(v, x))(bap_vars, x)["logits"]
  np.testing.assert_allclose(predictor(bap_net.module, bap_vars)(x)["logits"], want,
                             rtol=1e-4, atol=1e-4)
  # The up-sampler's transposed convolutions are plain convolutions (Deconv2x), so the
  # fine and average modes translate too.
  for mode in ("fine", "average"):
    module = network.module.clone(mode=mode)
    want = jax.jit(lambda v, x, m=module: m.apply(v, x))(variables, x)["logits"]
    np.testing.assert_allclose(predictor(module, variables)(x)["logits"], want,
                               rtol=1e-4, atol=1e-4)
