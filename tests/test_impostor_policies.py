"""Impostor policies: protocol steps 2-3, abstract shapes, compression."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from fgjax import impostor_policies
from fgjax import quantize
from fgjax.models import nets


def _setup(policy, pq_bytes=0):
  config = common.get_config()
  config.impostors.pq_bytes = pq_bytes
  network = nets.build(ml_collections.ConfigDict(dict(
      backbone="small_cnn", pretrained=False, weights_path="", net="impostor",
      pooling="avg", embed_dim=8)), 3)
  variables = network.init(0, 8)
  x = jax.random.normal(jax.random.key(0), (300, 8, 8, 3))
  emb = np.asarray(network.module.apply(variables, x)["embedding"])
  labels = np.arange(300) % 3
  return impostor_policies.make(policy, config), network, variables, x, emb, labels


def test_registered():
  assert impostor_policies.names() == ("compressed_fixed", "fixed", "loose", "none", "tied")
  with pytest.raises(ValueError, match=r"config\.impostors\.policy='sticky'"):
    impostor_policies.make("sticky", common.get_config())


@pytest.mark.parametrize("name", ["fixed", "loose", "tied"])
def test_protocol_steps_2_and_3(name):
  policy, network, variables, x, emb, labels = _setup(name)
  params, imps, state = policy.init(network, variables["params"], emb, labels)
  scale = np.linalg.norm(emb, axis=1).mean()
  np.testing.assert_allclose(state["scale"], scale, rtol=1e-5)
  np.testing.assert_allclose(imps.centers, emb / scale, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(imps.centers, axis=1).mean(), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(imps.labels, labels)
  # The rescaled network maps image i onto its impostor: one scale for both.
  after = network.module.apply({**variables, "params": params}, x)["embedding"]
  np.testing.assert_allclose(after, imps.centers, rtol=1e-4, atol=1e-5)
  assert policy.trainable == (name == "loose")
  abstract_imps, abstract_state = policy.abstract(300, 8)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract_imps) == jax.tree.map(
      lambda a: (a.shape, a.dtype), imps)
  assert abstract_state["scale"].shape == ()


def test_compressed_fixed_trains_against_codebook_points():
  policy, network, variables, _, emb, labels = _setup("compressed_fixed", pq_bytes=4)
  _, imps, state = policy.init(network, variables["params"], emb, labels)
  pq = quantize.ProductQuantizer(**state["pq"])
  np.testing.assert_allclose(quantize.reconstruct(pq, imps.centers), imps.centers,
                             atol=1e-5)
  assert jax.tree.map(lambda a: a.shape, policy.abstract(300, 8)[1]) == jax.tree.map(
      lambda a: a.shape, state)
  pq2, codes, when = impostor_policies.compress(imps, state, policy.config)
  assert when == "before training" and codes.shape == (300, 4) and codes.dtype == np.uint8
  np.testing.assert_array_equal(pq2.codebooks, np.asarray(pq.codebooks))
  _, _, after = impostor_policies.compress(imps, {"scale": 1.0}, policy.config)
  assert after == "after training"


def test_none_policy_has_no_impostors():
  policy, network, variables, _, emb, labels = _setup("none")
  params, imps, state = policy.init(network, variables["params"], emb, labels)
  assert imps is None and state == {} and params is variables["params"]
  assert policy.abstract(10, 8) == (None, {}) and not policy.uses_impostors
