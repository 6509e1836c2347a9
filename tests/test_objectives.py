"""Loss terms by name: NumPy references, weights, padding, state, and errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from fgjax import losses
from fgjax import objectives
from fgjax.impostors import ImpostorSet
from tests.test_losses import _elope_ref, _means_ref


def _batch(labels, valid=None):
  labels = np.asarray(labels, np.int32)
  return {"label": labels, "index": np.arange(len(labels), dtype=np.int32),
          "valid": np.ones(len(labels), bool) if valid is None else np.asarray(valid)}


def _setup(seed=0, b=6, e=4, c=3, m=6):
  rng = np.random.default_rng(seed)
  outputs = {"embedding": jnp.asarray(rng.normal(size=(b, e)), jnp.float32),
             "logits": jnp.asarray(rng.normal(size=(b, c)), jnp.float32)}
  imps = ImpostorSet(jnp.asarray(rng.normal(size=(m, e)), jnp.float32),
                     jnp.asarray(np.arange(m) % c, jnp.int32))
  return outputs, imps


def test_registered_terms():
  assert objectives.names() == ("attachment", "attention_center", "ce", "ce_crop",
                                "ce_drop", "ce_fine", "center", "elope", "exit_ce",
                                "heatmap", "nca")


def test_weighted_sum_matches_numpy_and_ignores_padding():
  outputs, imps = _setup()
  batch = _batch([0, 1, 2, 0, 1, 2], valid=[1, 1, 1, 1, 1, 0])
  objective = objectives.build(("ce", "nca", "attachment"), ml_collections.ConfigDict({
      "ce": {"weight": 0.5, "input": "logits"},
      "nca": {"weight": 1.0, "input": "embedding", "sigma": 0.7},
      "attachment": {"weight": 0.3, "input": "embedding"}}))
  total, state, metrics = objective(outputs, batch, imps, {})
  assert state == {}
  v = slice(0, 5)  # the valid rows
  logits = np.asarray(outputs["logits"], np.float64)[v]
  lse = np.log(np.exp(logits).sum(1))
  ce = np.mean(lse - logits[np.arange(5), batch["label"][v]])
  nca = np.asarray(losses.nca_loss(outputs["embedding"], batch["label"], imps.centers,
                                   imps.labels, 0.7, exclude=batch["index"]))[v].mean()
  emb, own = np.asarray(outputs["embedding"]), np.asarray(imps.centers)
  attach = ((emb - own) ** 2).sum(1)[v].mean()  # index i owns impostor i
  np.testing.assert_allclose(metrics["ce_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["nca_loss"], nca, rtol=1e-5)
  np.testing.assert_allclose(metrics["attachment_loss"], attach, rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * ce + nca + 0.3 * attach, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total)
  acc = (logits.argmax(1) == batch["label"][v]).mean()
  np.testing.assert_allclose(metrics["train_accuracy"], acc)


@pytest.mark.parametrize("name", ["center", "elope"])
def test_class_mean_terms_repeated_labels_accumulate(name):
  c = common.get_config().loss
  c[name].alpha = 0.4
  objective = objectives.build((name,), c)
  outputs, _ = _setup(1)
  state = objective.init_state(3, {"embedding": jax.ShapeDtypeStruct((1, 4), jnp.float32)})
  assert set(state) == {name} and state[name].shape == (3, 4)
  means0 = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32)
  labels = [0, 0, 0, 2, 2, 1]  # class 0 three times in one batch
  _, new_state, metrics = objective(outputs, _batch(labels), None, {name: means0})
  f = np.asarray(outputs["embedding"], np.float64)
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  labels = np.asarray(labels)
  if name == "center":
    want_means = _means_ref(np.asarray(means0), f, labels, 0.4)
    want = np.mean(0.5 * ((f - np.asarray(means0)[labels]) ** 2).sum(1))
  else:
    want, want_means = _elope_ref(f, labels, np.asarray(means0), 0.4, 16.0, 0.75)
  # Every row of a class moves its mean (a sum of updates, not the last row's).
  np.testing.assert_allclose(new_state[name], want_means, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics[f"{name}_loss"], want, rtol=1e-5)


def test_heatmap_is_smooth_l1_over_cells():
  pred = jnp.asarray([[[0.0, 2.0], [0.5, -0.2]], [[1.0, 1.0], [1.0, 1.0]]])
  target = jnp.zeros((2, 2, 2))
  term = objectives.make("heatmap", weight=1.0, input="heatmap", target="heatmap_target")
  loss, _, _ = term({"heatmap": pred, "heatmap_target": target}, _batch([0, 1], [1, 0]),
                    None, None)
  # Row 0 (row 1 is padding): cells 0, |2| - 0.5, 0.5 * 0.25, 0.5 * 0.04.
  np.testing.assert_allclose(loss, (0.0 + 1.5 + 0.125 + 0.02) / 4, rtol=1e-6)
  with pytest.raises(ValueError, match="localizer_map_size"):
    term({"heatmap": pred, "heatmap_target": jnp.zeros((2, 3, 3))}, _batch([0, 1]),
         None, None)


def test_describe_and_errors():
  c = common.get_config().loss
  assert objectives.build(("nca",), c).describe() == [
      {"name": "nca", "weight": 1.0, "input": "embedding", "sigma": 0.2}]
  with pytest.raises(ValueError, match="no terms"):
    objectives.build((), c)
  with pytest.raises(ValueError, match="twice"):
    objectives.build(("ce", "ce"), c)
  with pytest.raises(ValueError, match="'focal' is not a registered loss term"):
    objectives.build(("focal",), c)
  with pytest.raises(ValueError, match=r"config\.loss\.nca has field\(s\) gamma"):
    objectives.make("nca", weight=1.0, input="embedding", gamma=2.0)
  assert objectives.build(("nca", "attachment"), c).uses_impostors
  assert not objectives.build(("ce", "elope"), c).uses_impostors


def test_objective_is_jittable_and_differentiable():
  outputs, imps = _setup(3)
  objective = objectives.build(("nca", "elope"), common.get_config().loss)
  state = {"elope": jnp.zeros((3, 4))}

  def loss(emb):
    total, _, _ = objective({"embedding": emb}, _batch([0, 1, 2, 0, 1, 2]), imps, state)
    return total

  g = jax.jit(jax.grad(loss))(outputs["embedding"])
  assert g.shape == (6, 4) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
