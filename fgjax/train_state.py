"""The training state: one typed pytree, created once, restored into its abstract twin.

  state = train_state.create(params=..., batch_stats=..., impostors=..., loss_state=...,
                             impostor_state=..., tx=tx, train_centers=...)
  target = train_state.abstract(...)         # same arguments as ShapeDtypeStructs

`abstract` runs `create` under jax.eval_shape, so a checkpoint restore learns every
shape and dtype (optimiser moments included) without allocating or computing anything.
The optimiser only sees `trainable()`: the network params, the impostor centers with a
trainable policy and the impostor weights where there are some; impostor labels are
data, and the loss terms' state (class means) and the policy's state (protocol step 3 scale, PQ codebooks) follow their own rules.
"""

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fgjax import impostors as impostors_lib
from fgjax import parallel
from fgjax.impostors import ImpostorSet


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs.

  Attributes:
    step: int32 scalar, updates done.
    params: {'net': network params, 'impostors': ImpostorSet (M, E) or None}.
    batch_stats: BatchNorm running statistics of the network ({} without BN).
    opt_state: optax state of `trainable()`.
    loss_state: {term name: state} of the loss terms that keep one (fgjax.objectives).
    impostor_state: the impostor policy's state (fgjax.impostor_policies).
    train_centers: static: whether the impostor centers are optimiser leaves (the
      policy trains them). Frozen centers stay out of the optimiser's tree: at M = 1M
      their zero gradient and zero update alone were O(M d) per step.
  """
  step: jax.Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: Any
  loss_state: dict[str, Any]
  impostor_state: dict[str, Any]
  train_centers: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def impostors(self) -> Optional[ImpostorSet]:
    return self.params["impostors"]

  def variables(self) -> dict[str, Any]:
    """The network's flax variables."""
    out = {"params": self.params["net"]}
    if self.batch_stats:
      out["batch_stats"] = self.batch_stats
    return out

  def trainable(self) -> dict[str, Any]:
    return trainable_tree(self.params, self.train_centers)

  def with_trainable(self, trainable: dict[str, Any]) -> "TrainState":
    """The state with the optimiser's leaves replaced (impostor labels kept)."""
    imps = self.impostors
    if imps is not None:
      imps = imps._replace(**{k: trainable[k] for k in IMPOSTOR_LEAVES if k in trainable})
    return self.replace(params={"net": trainable["net"], "impostors": imps})


# The impostor fields the optimiser sees, under these names in `trainable_tree`.
IMPOSTOR_LEAVES = ("centers", "log_weights")


def trainable_tree(params: dict[str, Any], train_centers: bool) -> dict[str, Any]:
  """{'net': ..., 'centers'?: ..., 'log_weights'?: ...}: every float leaf the optimiser
  may update (fgjax.optim labels which of them train); the centers only where the
  policy trains them, impostor weights wherever there are some."""
  tree = {"net": params["net"]}
  imps = params["impostors"]
  if imps is not None:
    tree.update({k: getattr(imps, k) for k in IMPOSTOR_LEAVES
                 if getattr(imps, k) is not None and (k != "centers" or train_centers)})
  return tree


def create(*, params: dict[str, Any], batch_stats: dict[str, Any],
           impostors: Optional[ImpostorSet], loss_state: dict[str, Any],
           impostor_state: dict[str, Any], tx: optax.GradientTransformation,
           train_centers: bool = False) -> TrainState:
  """A fresh state at step 0, with its own copy of every array (`train_centers`:
  the policy trains the impostor centers, fgjax.impostor_policies.Policy.trainable).

  The copy is what makes donating the state to the jitted update safe: the initial
  network params come from the backbone registry, whose arrays other code (the
  feature cache, a second run in the same process) still reads.
  """
  params = {"net": params, "impostors": impostors}
  fresh = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731
  params, batch_stats = fresh(params), fresh(batch_stats)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats,
                    opt_state=tx.init(trainable_tree(params, train_centers)),
                    loss_state=fresh(loss_state), impostor_state=fresh(impostor_state),
                    train_centers=train_centers)


def abstract(**kwargs) -> TrainState:
  """`create`'s result as ShapeDtypeStructs, computed without allocating anything.

  Takes `create`'s keyword arguments; arrays may be ShapeDtypeStructs.
  """
  static = {k: kwargs.pop(k) for k in ("tx", "train_centers") if k in kwargs}
  return jax.eval_shape(lambda kw: create(**static, **kw), kwargs)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a TrainState lies on a mesh; the one place where its sharding is decided.

  Impostor rows are split along the mesh's data axis: the centers and labels, the
  optimiser's moments of trainable centers, and the policy-state entries with one row
  per training image (`row_fields`, e.g. the k-NN lists). At M = 10M impostors of
  d = 128 those are 5 GB per float32 copy, which no device should hold whole. Every
  other leaf is replicated (batches are what is split). M rarely divides by the device
  count, so row leaves are padded to `rows`, the next multiple of it, with absent
  impostors (fgjax.impostors.ABSENT labels, which the losses do not weigh); the padding
  depends on the device count, so `place` re-pads whatever it is given (a hook's fresh
  M-row arrays, a checkpoint written on another device count).

  Attributes:
    mesh: the run's mesh (fgjax.parallel.make_mesh).
    num_impostors: M, the present rows (0 without impostors).
    row_fields: impostor_state keys whose leaves have one row per impostor.
  """
  mesh: Any
  num_impostors: int
  row_fields: tuple[str, ...] = ()

  @property
  def rows(self) -> int:
    """M rounded up to a multiple of the device count."""
    n = self.mesh.devices.size
    return -(-self.num_impostors // n) * n

  def is_row_leaf(self, path) -> bool:
    """Whether the leaf at `path` (a TrainState key path) has one row per impostor."""
    names = _names(path)
    if names[:2] == ["params", "impostors"]:
      return True
    if names[0] == "opt_state":
      # The trainable tree is {'net': ..., 'centers': ..., 'log_weights': ...}: such a
      # key under 'net' would be a network parameter's name, not the impostors'.
      first = next((i for i, n in enumerate(names) if n in IMPOSTOR_LEAVES), None)
      return first is not None and "net" not in names[:first]
    return names[0] == "impostor_state" and names[1] in self.row_fields

  def _map(self, fn, state):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(self.is_row_leaf(p), p, x),
                                            state)

  def shardings(self, state: TrainState) -> TrainState:
    """A NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs)."""
    rows, replicated = parallel.row_sharding(self.mesh), parallel.replicated(self.mesh)
    return self._map(lambda row, p, x: rows if row else replicated, state)

  def abstract(self, state: TrainState, rows: Optional[int] = None) -> TrainState:
    """`state`'s ShapeDtypeStructs with `rows` (default `self.rows`) impostor rows,
    carrying their shardings where the rows split evenly (a restore target)."""
    rows = self.rows if rows is None else rows
    split = rows % self.mesh.devices.size == 0
    shardings = self.shardings(state)

    def fix(row, path, x):
      del path
      return jax.ShapeDtypeStruct((rows, *x.shape[1:]) if row else x.shape, x.dtype)
    out = self._map(fix, state)
    if not split:  # Restored whole, then `place` re-pads and splits.
      return out
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        out, shardings)

  def place(self, state: TrainState) -> TrainState:
    """The state on the mesh: row leaves cut to M and padded to `rows`, then split;
    everything else replicated."""
    def resize(row, path, x):
      if not row or x.shape[0] == self.rows:
        return x
      x = x[:self.num_impostors]
      fill = impostors_lib.ABSENT if _is_labels(path) else 0
      return jnp.pad(x, [(0, self.rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1),
                     constant_values=fill)
    return jax.device_put(self._map(resize, state), self.shardings(state))


def _names(path) -> list:
  return [getattr(k, "name", getattr(k, "key", None)) for k in path]


def _is_labels(path) -> bool:
  return _names(path)[:3] == ["params", "impostors", "labels"]
