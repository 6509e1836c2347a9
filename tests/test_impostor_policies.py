"""Impostor policies: protocol steps 2-3, abstract shapes, compression."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from fgjax import impostor_policies
from fgjax import impostors as impostors_lib
from fgjax import losses
from fgjax import optim
from fgjax import quantize
from fgjax import train_state
from fgjax.models import nets


def _setup(policy, pq_bytes=0, **impostor_fields):
  config = common.get_config()
  config.impostors.pq_bytes = pq_bytes
  for key, value in impostor_fields.items():
    config.impostors[key] = value
  network = nets.build(ml_collections.ConfigDict(dict(
      backbone="small_cnn", pretrained=False, weights_path="", net="impostor",
      pooling="avg", embed_dim=8)), 3)
  variables = network.init(0, 8)
  x = jax.random.normal(jax.random.key(0), (300, 8, 8, 3))
  emb = np.asarray(network.module.apply(variables, x)["embedding"])
  labels = np.arange(300) % 3
  return impostor_policies.make(policy, config), network, variables, x, emb, labels


def test_registered():
  assert impostor_policies.names() == ("compressed_fixed", "fixed", "knn", "knn_loose",
                                       "loose", "none", "tied")
  with pytest.raises(ValueError, match=r"config\.impostors\.policy='sticky'"):
    impostor_policies.make("sticky", common.get_config())


@pytest.mark.parametrize("name", ["fixed", "loose", "tied", "knn", "knn_loose"])
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
  # knn_loose trains its rows itself (lazy Adam), outside the main optimiser.
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


def _nearest_others(centers, queries, k):
  """Reference lists: the k nearest centers to each query, its own index left out."""
  d = ((np.asarray(queries, np.float64)[:, None] - np.asarray(centers, np.float64)[None])
       ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return np.argsort(d, axis=1, kind="stable")[:, :k]


class _Context:
  """A run's hook context with given training embeddings; placing is a no-op."""
  steps_per_epoch, total_steps = 10, 50

  def __init__(self, embeddings, labels):
    self.embeddings, self.labels, self.calls = embeddings, labels, 0

  def train_embeddings(self, state):
    self.calls += 1
    return self.embeddings, self.labels

  def place(self, state):
    return state


@pytest.mark.parametrize("name", ["knn", "knn_loose"])
def test_knn_lists_at_init_refresh_and_batch_rows(name):
  policy, network, variables, _, emb, labels = _setup(
      name, knn_k=7, knn_refresh_every_steps=20)
  params, imps, policy_state = policy.init(network, variables["params"], emb, labels)
  lists = np.asarray(policy_state["neighbors"])
  assert lists.shape == (300, 7) and lists.dtype == np.int32
  # At init the embeddings are the impostors: each image's 7 nearest other impostors.
  np.testing.assert_array_equal(lists, _nearest_others(imps.centers, imps.centers, 7))
  _, abstract_state = policy.abstract(300, 8)
  assert (abstract_state["neighbors"].shape, abstract_state["neighbors"].dtype) == (
      (300, 7), jnp.int32)
  # The Fixed / Loose half decides the scheme; knn_loose trains its rows itself.
  assert not policy.trainable
  assert isinstance(policy, impostor_policies.Loose if name == "knn_loose"
                    else impostor_policies.Fixed)

  state = train_state.create(params={}, batch_stats={}, impostors=imps, loss_state={},
                             impostor_state=policy_state, tx=optax.identity())
  moved = np.asarray(imps.centers) + np.random.default_rng(1).normal(
      scale=0.3, size=imps.centers.shape).astype(np.float32)
  context = _Context(moved, labels)
  for step in (1, 19, 21, 40 + 10):  # not a refresh step ... the last step (50)
    assert policy.after_step(state, step, context) is state
  assert context.calls == 0
  refreshed = policy.after_step(state, 20, context)
  new_lists = np.asarray(refreshed.impostor_state["neighbors"])
  np.testing.assert_array_equal(new_lists, _nearest_others(imps.centers, moved, 7))
  assert (new_lists != lists).any(axis=1).mean() > 0.5
  np.testing.assert_array_equal(refreshed.impostor_state["scale"], policy_state["scale"])

  batch = {"index": np.array([4, 0, 299], np.int32), "label": np.zeros(3, np.int32)}
  extended = policy.extend_batch(policy_state, batch)
  np.testing.assert_array_equal(extended["neighbors"], lists[[4, 0, 299]])
  assert set(extended) == {"index", "label", "neighbors"}
  assert impostor_policies.make("fixed", policy.config).extend_batch(
      policy_state, batch) is batch


def test_knn_k_is_capped_at_every_other_impostor():
  policy, network, variables, _, emb, labels = _setup("knn", knn_k=1000)
  _, _, policy_state = policy.init(network, variables["params"], emb[:12], labels[:12])
  lists = np.asarray(policy_state["neighbors"])
  assert lists.shape == (12, 11)
  for i, row in enumerate(lists):
    assert sorted(row) == [j for j in range(12) if j != i]
  assert policy.abstract(12, 8)[1]["neighbors"].shape == (12, 11)
  with pytest.raises(ValueError, match="needs >= 2 training images"):
    policy.abstract(1, 8)


def test_neighbor_lists_drop_the_farthest_where_the_own_index_is_not_found():
  # Centers 0 and 1 coincide (either may come first); query 2 sits far from its own
  # center, so its own index is not among its k + 1 = 3 nearest (0, 1, 3).
  centers = np.array([[0, 0], [0, 0], [9, 9], [1, 0], [3, 0]], np.float32)
  queries = np.array([[0, 0], [0, 0], [0.1, 0], [1, 0], [3, 0]], np.float32)
  imps = impostors_lib.ImpostorSet(centers, np.zeros(5, np.int32))
  lists = np.asarray(impostor_policies.neighbor_lists(imps, queries, 2, "exact",
                                                      block=2))
  assert [sorted(r) for r in lists[:4]] == [[1, 3], [0, 3], [0, 1], [0, 1]]
  assert lists[4][0] == 3 and lists[4][1] in (0, 1)   # nearest first


def test_lazy_adam_rows_is_adam_on_the_rows_it_touches():
  rng = np.random.default_rng(3)
  params = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(0.1))
  dense, opt = params, tx.init(params)
  lazy, mu, nu = params, jnp.zeros_like(params), jnp.zeros_like(params)
  rows = jnp.array([4, 1, 0, 6])            # 6 is padding: dropped
  for step in range(1, 4):
    g = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    full = jnp.zeros_like(params).at[rows].add(g, mode="drop")
    updates, opt = tx.update(full, opt, dense)
    dense = optax.apply_updates(dense, updates)
    lazy, mu, nu = optim.lazy_adam_rows(lazy, mu, nu, rows, g, step, 0.1)
  touched = np.array([0, 1, 4])
  np.testing.assert_allclose(np.asarray(lazy)[touched], np.asarray(dense)[touched],
                             rtol=1e-6)
  # Untouched rows: dense Adam leaves them too (zero gradient, zero moments) here.
  np.testing.assert_array_equal(np.asarray(lazy)[[2, 3, 5]], np.asarray(params)[[2, 3, 5]])
  assert np.abs(np.asarray(lazy)[touched] - np.asarray(params)[touched]).min() > 0.01


def test_knn_loose_row_view_gives_the_loss_of_the_whole_set():
  policy, network, variables, _, emb, labels = _setup("knn_loose", knn_k=5)
  params, imps, policy_state = policy.init(network, variables["params"], emb, labels)
  assert policy_state["centers_mu"].shape == imps.centers.shape
  state = train_state.create(params={}, batch_stats={}, impostors=imps, loss_state={},
                             impostor_state=policy_state, tx=optax.identity())
  index = jnp.array([7, 3, 7, 250], jnp.int32)
  batch = policy.extend_batch(policy_state, {"index": index, "label": labels[index]})
  view = policy.row_view(state, batch)
  rows = np.asarray(view.rows)
  present = rows[rows < 300]
  assert sorted(present) == sorted(set(np.asarray(batch["neighbors"]).ravel())
                                   | set(np.asarray(index)))
  assert len(present) == len(set(present)) and (rows[len(present):] == 300).all()
  queries = jnp.asarray(emb[np.asarray(index)]) + 0.01
  local = view.impostors(imps, jnp.take(imps.centers, view.rows, axis=0, mode="clip"))
  got = losses.knn_nca_loss(queries, view.batch["label"], local.centers, local.labels,
                            view.batch["neighbors"], 0.3, exclude=view.batch["index"])
  want = losses.knn_nca_loss(queries, batch["label"], imps.centers, imps.labels,
                             batch["neighbors"], 0.3, exclude=index)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(np.max(np.asarray(want))) > 0.01


def test_lists_from_scann_on_the_host_equal_the_exact_ones_and_skip_absent_rows():
  rng = np.random.default_rng(4)
  centers = rng.normal(size=(40, 6)).astype(np.float32)
  queries = centers + rng.normal(scale=0.05, size=centers.shape).astype(np.float32)
  imps = impostors_lib.pad_rows(
      impostors_lib.ImpostorSet(jnp.asarray(centers), jnp.zeros(40, jnp.int32)), 44)
  lists = {b: np.asarray(impostor_policies.neighbor_lists(imps, queries, 5, b))
           for b in ("exact", "scann")}
  np.testing.assert_array_equal(lists["scann"], lists["exact"])
  np.testing.assert_array_equal(lists["exact"], _nearest_others(centers, queries, 5))
