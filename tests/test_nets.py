"""Networks by name: outputs, head-only path, initialisation, protocol step 3 scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fgjax.models import nets
from fgjax.models import pooling


def model_config(**overrides):
  c = common.get_config().model
  c.update(dict(backbone="small_cnn", pretrained=False, net="impostor", pooling="avg",
                pooling_k=2, embed_dim=16, localizer_size=8, localizer_map_size=4,
                exit_stages=("stage1", "map")))
  c.update(overrides)
  return c


def test_registered_names():
  assert nets.names() == ("bap", "bap_impostor", "c2f", "convnet", "convnet_exits",
                          "convnet_extra", "elope", "elope_localized", "impostor")


# The attention networks pool by bilinear attention, not by config.model.pooling: their
# outputs and head path are tested in tests/test_bap.py and tests/test_coarse2fine.py.
_ATTENTION_NETS = ("bap", "bap_impostor", "c2f")


@pytest.mark.parametrize("net", [n for n in nets.names() if n not in _ATTENTION_NETS])
@pytest.mark.parametrize("pool", pooling.names())
def test_outputs_and_head_path(net, pool):
  network = nets.build(model_config(net=net, pooling=pool), num_classes=7)
  variables = network.init(seed=3, image_size=8)
  x = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))
  out = network.module.apply(variables, x, train=False)
  backbone_keys = set(network.spec.outputs) | {"mean_map"}
  if net == "elope_localized":  # fgjax.models.localized: the module's outputs too
    backbone_keys |= {"heatmap", "box", "heatmap_target"}
  head_keys = {"features", "embedding"} | ({"logits"} if network.has_logits else set())
  exits = ("stage1", "map") if net == "convnet_exits" else ()
  if exits:  # one (N, C) logit row per exit stage
    head_keys |= {"exit_logits"}
    assert out["exit_logits"].shape == (5, 2, 7)
  assert set(out) == backbone_keys | head_keys
  assert out["features"].shape == (5, 128)  # SmallCNN's map has 128 channels
  width = 128 if net in ("convnet", "convnet_exits") else 16  # embedding = features
  assert out["embedding"].shape == (5, width)
  if network.has_logits:
    assert out["logits"].shape == (5, 7)
  assert network.reads == tuple(dict.fromkeys((pooling.reads(pool),) + exits))
  # The head alone, on the backbone outputs it reads, gives the same head outputs.
  head = network.module.apply(variables, {k: out[k] for k in network.reads}, method="head")
  assert set(head) == head_keys
  for k in head_keys:
    np.testing.assert_allclose(head[k], out[k], rtol=1e-6, atol=1e-6)
  shapes = network.output_shapes(8)
  assert {k: v.shape[1:] for k, v in shapes.items()} == {
      k: v.shape[1:] for k, v in out.items()}
  # ELoPE's heat map of the classifier: the channel mean of the map.
  np.testing.assert_allclose(out["mean_map"], np.asarray(out["map"]).mean(-1), rtol=1e-5,
                             atol=1e-6)


def test_pooling_is_the_configured_one():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  for pool, ref in (("max", lambda m: m.max((1, 2))),
                    ("kmax", lambda m: np.sort(m.reshape(2, -1, m.shape[-1]), 1)[:, -2:].mean(1))):
    network = nets.build(model_config(net="convnet", pooling=pool, pooling_k=2), 3)
    out = network.module.apply(network.init(0, 8), x)
    np.testing.assert_allclose(out["features"], ref(np.asarray(out["map"])), rtol=1e-6)


def test_head_init_equals_whole_network_init():
  # Network.init draws only the heads; flax derives each layer's values from the seed
  # and the layer's name, so they equal those of a whole-network init.
  network = nets.build(model_config(net="convnet_extra", pooling="weighted_kmax"), 4)
  ours = network.init(seed=5, image_size=8)
  whole = network.module.init(jax.random.key(5), jnp.zeros((1, 8, 8, 3)), train=False)
  for layer in ("embed", "classifier", "pool"):
    jax.tree.map(np.testing.assert_array_equal, ours["params"][layer],
                 whole["params"][layer])
  # The backbone comes from the registry, untouched.
  jax.tree.map(np.testing.assert_array_equal, ours["params"]["backbone"],
               network.spec.variables["params"])
  jax.tree.map(np.testing.assert_array_equal, ours["batch_stats"]["backbone"],
               network.spec.variables["batch_stats"])


def test_elope_classifier_reads_the_linear_embedding():
  network = nets.build(model_config(net="elope", pooling="kmax"), 5)
  variables = network.init(1, 8)
  out = network.module.apply(variables, jax.random.normal(jax.random.key(3), (4, 8, 8, 3)))
  w = variables["params"]["classifier"]
  # No ReLU between embedding and classifier (ConvNet-extra has one).
  np.testing.assert_allclose(out["logits"], out["embedding"] @ w["kernel"] + w["bias"],
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.min(out["embedding"])) < 0


def test_scale_embedding_scales_the_embedding():
  network = nets.build(model_config(), 4)
  variables = network.init(0, 8)
  x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
  before = network.module.apply(variables, x)["embedding"]
  scaled = {**variables, "params": network.scale_embedding(variables["params"], 0.25)}
  after = network.module.apply(scaled, x)["embedding"]
  np.testing.assert_allclose(after, 0.25 * before, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="no embedding layer"):
    convnet = nets.build(model_config(net="convnet"), 4)
    convnet.scale_embedding(convnet.init(0, 8)["params"], 0.5)


def test_bad_names_and_options():
  with pytest.raises(ValueError, match=r"config\.model\.net='resnext'.*convnet"):
    nets.build(model_config(net="resnext"), 3)
  with pytest.raises(ValueError, match=r"config\.model\.pooling='median'"):
    nets.build(model_config(pooling="median"), 3)
  with pytest.raises(ValueError, match="K = 0"):
    nets.build(model_config(pooling="kmax", pooling_k=0), 3)
  with pytest.raises(ValueError, match="already registered"):
    nets.register("impostor")(nets.ConvNet)
