"""The training state: one typed pytree, created once, restored into its abstract twin.

  state = train_state.create(params=..., batch_stats=..., impostors=..., loss_state=...,
                             impostor_state=..., tx=tx)
  target = train_state.abstract(...)         # same arguments as ShapeDtypeStructs

`abstract` runs `create` under jax.eval_shape, so a checkpoint restore learns every
shape and dtype (optimiser moments included) without allocating or computing anything.
The optimiser only sees `trainable()`: the network params and, with a trainable policy,
the impostor centers; impostor labels are data, and the loss terms' state (class means)
and the policy's state (protocol step 3 scale, PQ codebooks) follow their own rules.
"""

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

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
  """
  step: jax.Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: Any
  loss_state: dict[str, Any]
  impostor_state: dict[str, Any]

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
    return trainable_tree(self.params)

  def with_trainable(self, trainable: dict[str, Any]) -> "TrainState":
    """The state with the optimiser's leaves replaced (impostor labels kept)."""
    imps = self.impostors
    if "centers" in trainable:
      imps = ImpostorSet(trainable["centers"], imps.labels)
    return self.replace(params={"net": trainable["net"], "impostors": imps})


def trainable_tree(params: dict[str, Any]) -> dict[str, Any]:
  """{'net': ..., 'centers': ...}: every float leaf the optimiser may update."""
  tree = {"net": params["net"]}
  if params["impostors"] is not None:
    tree["centers"] = params["impostors"].centers
  return tree


def create(*, params: dict[str, Any], batch_stats: dict[str, Any],
           impostors: Optional[ImpostorSet], loss_state: dict[str, Any],
           impostor_state: dict[str, Any], tx: optax.GradientTransformation
           ) -> TrainState:
  """A fresh state at step 0, with its own copy of every array.

  The copy is what makes donating the state to the jitted update safe: the initial
  network params come from the backbone registry, whose arrays other code (the
  feature cache, a second run in the same process) still reads.
  """
  params = {"net": params, "impostors": impostors}
  fresh = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731
  params, batch_stats = fresh(params), fresh(batch_stats)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(trainable_tree(params)),
                    loss_state=fresh(loss_state), impostor_state=fresh(impostor_state))


def abstract(**kwargs) -> TrainState:
  """`create`'s result as ShapeDtypeStructs, computed without allocating anything.

  Takes `create`'s keyword arguments; arrays may be ShapeDtypeStructs.
  """
  tx = kwargs.pop("tx")
  return jax.eval_shape(lambda kw: create(tx=tx, **kw), kwargs)


def place(state: TrainState, mesh) -> TrainState:
  """The state on `mesh`'s devices: every leaf replicated (batches are what is split).

  The one place where the state's sharding is decided.
  """
  return parallel.replicate(state, mesh)
