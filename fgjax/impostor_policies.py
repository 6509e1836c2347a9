"""Impostor policies by name: how impostors are born, whether they train, and their hooks.

Impostor paper, section 4 ("Protocol"): (1) the network is the pretrained backbone with
a new embedding layer; (2) every training image's embedding under that network becomes
its impostor (impostor i belongs to training image i, the dataset index batches carry);
(3) impostors, and the embedding layer with them, are divided by the mean impostor norm,
so one sigma means the same for every embedding size and initialisation.

  policy = impostor_policies.make(name, config)
  params, impostors, policy_state = policy.init(network, params, embeddings, labels)
  batch = policy.extend_batch(policy_state, batch)     # inside the jitted update
  state = policy.after_step(state, step, context)      # called after every update

`policy_state` lives in `TrainState.impostor_state` (checkpointed): {'scale': the
protocol step 3 factor} for every impostor policy, plus {'pq': codebooks and rotation}
for compressed_fixed and {'neighbors': (M, k) int32 lists} for the k-NN policies.
`extend_batch` is how a policy hands the loss terms per-batch data derived from its
state (the fields it adds are named in `adds_batch_fields`, and some term must read
them: fgjax.config_checks); the update path calls it for every policy and knows none.
Registered:
  none              no impostors (ConvNet schemes).
  fixed             frozen at the initial embeddings.
  compressed_fixed  fixed, against OPQ/PQ-compressed impostors (paper, "Impostors
                    compression": the quantizer is trained on the initial impostors
                    and the network trains against their decoded, lossy values).
  loose             optimised with the network (eq. 6's attachment term keeps them close).
  tied              frozen between resets to the current embeddings every
                    config.impostors.reset_every_epochs epochs (eq. 5, relaxed).
  knn, knn_loose    fixed / loose impostors trained by k-NN NCA (Meyer et al.'s k-NN
                    RBF solver, NNGK review eq. 6-7): each training image keeps a list
                    of the config.impostors.knn_k impostors nearest to its embedding,
                    and the batch carries its rows as batch['neighbors'], which term
                    'nca' then sums over (fgjax.losses.knn_nca_loss).
A new policy is one `@register`ed class plus its test.
"""

from typing import Any, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import impostors as impostors_lib
from fgjax import optim
from fgjax import quantize
from fgjax import registries
from fgjax import sharded_search

POLICIES = registries.Registry("impostor policy", "config.impostors.policy",
                               name_attr="name")
register = POLICIES.register
names = POLICIES.names


def make(name: str, config) -> "Policy":
  """Policy `name` configured by `config` (config.impostors, config.seed)."""
  return POLICIES.get(name)(config)


class Context(Protocol):
  """What a hook may use from the running job (fgjax.train provides it)."""
  steps_per_epoch: int
  total_steps: int

  def train_embeddings(self, state) -> tuple[np.ndarray, np.ndarray]:
    """(M, E) embeddings and (M,) labels of every training image, in index order."""

  def place(self, state):
    """The state with its arrays on the devices, sharded by the run's rules."""


class RowView(NamedTuple):
  """The impostor rows one batch touches, for a policy that trains them itself.

  Attributes:
    rows: (R,) distinct row ids into the impostor set; ids past its end are padding
      (gathered as absent impostors, dropped from updates).
    batch: the batch with its impostor ids ('neighbors', 'index') remapped to
      positions in `rows`.
  """
  rows: jax.Array
  batch: dict[str, Any]

  def impostors(self, imps: impostors_lib.ImpostorSet,
                centers: jax.Array) -> impostors_lib.ImpostorSet:
    """The set the loss sees: `centers` (R, d), the differentiated rows, with the
    labels and weights of those rows of `imps`."""
    take = lambda x: None if x is None else jnp.take(  # noqa: E731
        x, self.rows, axis=0, mode="clip")
    labels = jnp.where(self.rows < imps.labels.shape[0], take(imps.labels),
                       impostors_lib.ABSENT)
    return impostors_lib.ImpostorSet(centers, labels, take(imps.log_weights))


class Policy:
  """Base: impostors from the initial embeddings (protocol steps 2-3), no hooks."""
  name = ""
  uses_impostors = True
  trainable = False       # impostor centers are optimiser leaves
  adds_batch_fields: tuple[str, ...] = ()  # what `extend_batch` adds
  # Policy-state entries with one row per impostor, split over the devices with the
  # impostors (fgjax.train_state.Layout).
  row_fields: tuple[str, ...] = ()

  def __init__(self, config):
    self.config = config
    # Learnable per-impostor weights (NNGK review eq. 4 / 7), on any scheme.
    self.weighted = bool(config.impostors.get("weights", False))

  def init(self, network, params: dict[str, Any], embeddings: np.ndarray,
           labels: np.ndarray) -> tuple[dict[str, Any], Optional[impostors_lib.ImpostorSet],
                                        dict[str, Any]]:
    """(net params with the embedding layer rescaled, impostors, policy state).

    Args:
      network: the fgjax.models.nets.Network (it knows its embedding layer).
      params: the initial network params.
      embeddings: (M, E) embeddings of the training images under `params`, index order.
      labels: (M,) their labels.
    """
    imps, scale = impostors_lib.init_impostors(jnp.asarray(embeddings),
                                               jnp.asarray(labels))
    if self.weighted:  # w_j = 1: training starts from the unweighted rule.
      imps = imps._replace(log_weights=jnp.zeros(imps.labels.shape, jnp.float32))
    # Protocol step 3: the last layer shrinks by the same factor as the impostors, so
    # embeddings and impostors stay on one scale.
    params = network.scale_embedding(params, 1.0 / scale)
    return params, imps, {"scale": jnp.asarray(scale, jnp.float32)}

  def abstract(self, num_impostors: int, width: int):
    """Shapes of (impostors, policy state) for a restore, without computing them."""
    imps = impostors_lib.ImpostorSet(
        jax.ShapeDtypeStruct((num_impostors, width), jnp.float32),
        jax.ShapeDtypeStruct((num_impostors,), jnp.int32),
        jax.ShapeDtypeStruct((num_impostors,), jnp.float32) if self.weighted else None)
    return imps, {"scale": jax.ShapeDtypeStruct((), jnp.float32)}

  def after_step(self, state, step: int, context: Context):
    """The state after update `step` (1-based); the base policy changes nothing."""
    del step, context
    return state

  def extend_batch(self, policy_state: dict[str, Any],
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch the loss terms see: `batch` plus `adds_batch_fields` from the policy
    state. Traced inside the jitted update; the base policy adds nothing."""
    del policy_state
    return batch

  def row_view(self, state, batch) -> Optional[RowView]:
    """None: the loss sees every impostor (and the optimiser trains them if
    `trainable`). A RowView: the loss sees only the rows the batch touches, and
    `update_rows` trains them. Traced inside the jitted update."""
    del state, batch
    return None

  def update_rows(self, state, view: RowView, grads: jax.Array, learning_rate):
    """The state after the rows of `view` took their gradients (R, d)."""
    raise NotImplementedError(f"impostor policy {self.name!r} has no row view.")


@register("none")
class NoImpostors(Policy):
  """ConvNet schemes: no impostors, no policy state."""
  uses_impostors = False

  def init(self, network, params, embeddings, labels):
    return params, None, {}

  def abstract(self, num_impostors, width):
    return None, {}


@register("fixed")
class Fixed(Policy):
  """Impostors frozen at the initial network's embeddings."""


@register("loose")
class Loose(Policy):
  """Impostors optimised jointly with the network (their own lr multiplier, no decay)."""
  trainable = True


@register("tied")
class Tied(Policy):
  """Frozen between resets; every `reset_every_epochs` epochs they become the current
  embeddings of the training images (not after the last step: evaluation follows)."""

  def after_step(self, state, step, context):
    period = int(self.config.impostors.reset_every_epochs) * context.steps_per_epoch
    if not period or step % period or step >= context.total_steps:
      return state
    emb, labels = context.train_embeddings(state)
    # Learned weights stay with their training images (context.place re-pads rows).
    imps = state.impostors._replace(centers=jnp.asarray(emb),
                                    labels=jnp.asarray(labels, jnp.int32))
    return context.place(state.replace(params={**state.params, "impostors": imps}))


@register("compressed_fixed")
class CompressedFixed(Policy):
  """Fixed impostors replaced by their PQ reconstruction before training."""

  def init(self, network, params, embeddings, labels):
    params, imps, policy_state = super().init(network, params, embeddings, labels)
    pq = train_quantizer(imps.centers, self.config)
    imps = imps._replace(centers=quantize.reconstruct(pq, imps.centers))
    return params, imps, {**policy_state, "pq": pq._asdict()}

  def abstract(self, num_impostors, width):
    imps, policy_state = super().abstract(num_impostors, width)
    nsub = int(self.config.impostors.pq_bytes)
    pq = {"codebooks": jax.ShapeDtypeStruct((nsub, quantize.MAX_CENTROIDS, width // nsub),
                                            jnp.float32),
          "rotation": jax.ShapeDtypeStruct((width, width), jnp.float32)}
    return imps, {**policy_state, "pq": pq}


class _NeighborLists(Policy):
  """k-NN impostor training on top of a fixed or loose policy (its other half in the MRO).

  Meyer et al. search the k nearest neighbours of each training image once every few
  epochs, not every step (NNGK review, section 3): so the state holds one list per
  training image, the k impostors nearest to its embedding, built at init (where the
  embeddings are the impostors) and refreshed every
  config.impostors.knn_refresh_every_steps steps (0: never) from the current
  embeddings against the current impostors (`neighbor_lists`; not after the last step,
  which only evaluation follows). A list never holds the image's own impostor: it is
  searched with k + 1 and dropped, so every image has k others (the loss also excludes
  it, batch['index'], which then masks nothing). k is capped at M - 1: every other
  impostor, where term 'nca' equals the full loss of eq. (4).
  """
  adds_batch_fields = ("neighbors",)
  row_fields = ("neighbors",)

  def _k(self, num_impostors: int) -> int:
    if num_impostors < 2:
      raise ValueError(f"impostor policy {self.name!r} needs >= 2 training images (each "
                       f"one's neighbours are the others); got {num_impostors}.")
    return min(int(self.config.impostors.knn_k), num_impostors - 1)

  def _lists(self, imps, queries) -> jax.Array:
    return neighbor_lists(imps, queries, self._k(queries.shape[0]),
                          self.config.impostors.knn_backend)

  def init(self, network, params, embeddings, labels):
    params, imps, policy_state = super().init(network, params, embeddings, labels)
    # The rescaled network maps image i onto impostor i: the impostors are the queries.
    return params, imps, {**policy_state,
                          "neighbors": self._lists(imps, imps.centers)}

  def abstract(self, num_impostors, width):
    imps, policy_state = super().abstract(num_impostors, width)
    lists = jax.ShapeDtypeStruct((num_impostors, self._k(num_impostors)), jnp.int32)
    return imps, {**policy_state, "neighbors": lists}

  def after_step(self, state, step, context):
    state = super().after_step(state, step, context)
    every = int(self.config.impostors.knn_refresh_every_steps)
    if not every or step % every or step >= context.total_steps:
      return state
    emb, _ = context.train_embeddings(state)
    lists = self._lists(state.impostors, emb)
    return context.place(state.replace(
        impostor_state={**state.impostor_state, "neighbors": lists}))

  def extend_batch(self, policy_state, batch):
    # (B, k) rows of the (M, k) lists, gathered on device where the lists live.
    return {**batch, "neighbors": jnp.take(policy_state["neighbors"], batch["index"],
                                           axis=0)}


@register("knn")
class KnnFixed(_NeighborLists, Fixed):
  """Fixed impostors, k-NN NCA over per-image neighbour lists."""


@register("knn_loose")
class KnnLoose(_NeighborLists, Loose):
  """Loose impostors (scheme 'loose'), k-NN NCA over per-image lists, trained by lazy
  Adam on the rows a batch touches (its lists and its own impostors).

  The loss of one batch reaches at most B (k + 1) of the M impostors, but dense Adam
  reads and writes all M d centers and both moments every step: at M = 1M, d = 128
  that was 0.67 s of a step whose loss took 9 ms (BENCHMARKS.md, impostors at scale).
  So the impostors are not leaves of the main optimiser (`trainable` False): the
  update path hands the loss only the touched rows (`row_view`) and this policy moves
  them with `fgjax.optim.lazy_adam_rows` at the impostors' learning rate, keeping the
  moments as policy state split with the impostors. A row untouched by a step keeps
  its moments that step (TensorFlow's LazyAdam); where every row is touched every
  step (k = M - 1) it is dense Adam exactly.
  """
  trainable = False
  row_fields = ("neighbors", "centers_mu", "centers_nu")

  def init(self, network, params, embeddings, labels):
    params, imps, policy_state = super().init(network, params, embeddings, labels)
    zeros = jnp.zeros_like(imps.centers)
    return params, imps, {**policy_state, "centers_mu": zeros, "centers_nu": zeros}

  def abstract(self, num_impostors, width):
    imps, policy_state = super().abstract(num_impostors, width)
    return imps, {**policy_state, "centers_mu": imps.centers, "centers_nu": imps.centers}

  def row_view(self, state, batch):
    lists = batch["neighbors"]
    ids = jnp.concatenate([lists.reshape(-1), batch["index"]])
    rows, inverse = jnp.unique(ids, size=ids.shape[0], return_inverse=True,
                               fill_value=state.impostors.centers.shape[0])
    inverse = inverse.reshape(-1).astype(jnp.int32)
    return RowView(rows, {**batch, "neighbors": inverse[:lists.size].reshape(lists.shape),
                          "index": inverse[lists.size:]})

  def update_rows(self, state, view, grads, learning_rate):
    imps, policy_state = state.impostors, state.impostor_state
    centers, mu, nu = optim.lazy_adam_rows(
        imps.centers, policy_state["centers_mu"], policy_state["centers_nu"], view.rows,
        grads, state.step + 1, learning_rate)
    return state.replace(
        params={**state.params, "impostors": imps._replace(centers=centers)},
        impostor_state={**policy_state, "centers_mu": mu, "centers_nu": nu})


def neighbor_lists(impostors: impostors_lib.ImpostorSet, queries: Any, k: int,
                   backend: str, block: int = 4096) -> jax.Array:
  """(M, k) int32: row i lists the k impostors nearest to queries[i], nearest first,
  never impostor i itself nor an absent row.

  Args:
    impostors: the M impostors, possibly padded with absent rows and split over a
      mesh as the training state holds them (searched where they live:
      fgjax.sharded_search.index_over).
    queries: (M, d) embeddings of the training images, index order (query i owns
      impostor i).
    k: 1 <= k <= M - 1.
    backend: fgjax.search backend ('exact' on device, 'scann' on the host CPU).
    block: queries per search call: bounds the exact backend's (block, M) distances.
  """
  index = sharded_search.index_over(impostors, backend)
  found = jnp.concatenate([jnp.asarray(index.neighbors(queries[s:s + block], k + 1)[1])
                           for s in range(0, queries.shape[0], block)])
  # Drop each row's own index, or its farthest entry where the own one was not found
  # (a tie at distance 0 with another impostor); a stable sort keeps distance order.
  own = found == jnp.arange(found.shape[0])[:, None]
  drop = own | (~own.any(axis=1, keepdims=True) & (jnp.arange(k + 1) == k))
  order = jnp.argsort(drop, axis=1, stable=True)[:, :k]
  return jnp.take_along_axis(found, order, axis=1).astype(jnp.int32)


def train_quantizer(centers: Any, config) -> quantize.ProductQuantizer:
  """OPQ (or PQ) codebooks with config.impostors.pq_bytes one-byte codes per impostor."""
  c = config.impostors
  fn = quantize.train_opq if c.pq_opq else quantize.train_pq
  return fn(jnp.asarray(centers), int(c.pq_bytes), seed=config.seed)


def compress(impostors: impostors_lib.ImpostorSet, policy_state: dict[str, Any],
             config) -> tuple[quantize.ProductQuantizer, np.ndarray, str]:
  """PQ codes of the final impostors: (quantizer, (M, m) uint8 codes, when it was trained).

  compressed_fixed reuses the quantizer it trained against; every other policy
  compresses its final impostors after training (deployment only).
  """
  if "pq" in policy_state:
    pq, when = quantize.ProductQuantizer(**policy_state["pq"]), "before training"
  else:
    pq, when = train_quantizer(impostors.centers, config), "after training"
  pq = quantize.ProductQuantizer(*(np.asarray(x) for x in pq))
  return pq, np.asarray(quantize.encode(pq, impostors.centers)), when

