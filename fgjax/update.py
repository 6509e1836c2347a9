"""The one update path: forward, weighted loss terms, gradients, optimiser step.

  update = jax.jit(update_lib.make_update(network, objective, tx, frozen=..., forward=...,
                                          policy=...), donate_argnums=(0,))
  state, metrics = update(state, batch)

The impostor policy may add per-batch fields derived from its state before the loss
sees the batch (`Policy.extend_batch`, e.g. the k-NN policies' batch['neighbors']):
traced here, inside the one jitted step, so nothing policy-specific runs in the loop.

`forward` says how the network runs during training:
  'train'     backbone and heads in train mode (BatchNorm batch statistics, updated
              running statistics): config.model.trainable='all'.
  'frozen_bn' the backbone's BatchNorm on running statistics, heads in train mode:
              part of the backbone trains ('last:N') or none of it ('head') but the
              images change every step (augmentation).
  'heads'     only the layers after the cached backbone outputs (batch['backbone'] =
              {name: array}): head-only training on a CPU budget, or with 'last:N'
              the backbone's last N blocks too (BatchNorm as in 'frozen_bn').
Frozen backbone blocks are constants of the loss (`jax.lax.stop_gradient`): the
optimiser masks them anyway, and stopping the gradient spares the backward pass through
them (with 'last:3' of Lite0 that is most of the step).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from fgjax import objectives
from fgjax import optim
from fgjax import train_state as train_state_lib

FORWARDS = ("train", "frozen_bn", "heads")


def forward_mode(trainable: str, cache_features: bool) -> str:
  """The `forward` of a run: config.model.trainable and config.train.cache_features."""
  if cache_features:
    return "heads"
  return "train" if trainable == "all" else "frozen_bn"


def stop_frozen(net_params: dict[str, Any],
                frozen: frozenset[tuple[str, ...]]) -> dict[str, Any]:
  """Network params with the frozen subtrees (optim.frozen_paths) behind stop_gradient."""
  if not frozen:
    return net_params
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jax.lax.stop_gradient(p)
      if optim.is_frozen([k.key for k in path], frozen) else p, net_params)


def _largest_valid_norm(embedding: jax.Array, valid: jax.Array) -> jax.Array:
  """Largest row L2 norm among valid rows: what fgjax.divergence watches."""
  norms = jnp.linalg.norm(jax.lax.stop_gradient(embedding).astype(jnp.float32), axis=-1)
  return jnp.max(jnp.where(valid, norms, 0.0))


def make_update(network, objective: objectives.Objective,
                tx: optax.GradientTransformation, *,
                frozen: frozenset[tuple[str, ...]],
                forward: str, seed: int = 0, policy=None,
                impostor_learning_rate: Optional[optax.Schedule] = None):
  """update(state, batch) -> (state, metrics) for the given network and loss.

  Args:
    network: a fgjax.models.nets.Network.
    objective: the weighted loss terms.
    tx: the optimiser over `state.trainable()`.
    frozen: parameter subtrees that do not train (optim.frozen_paths).
    forward: one of FORWARDS (module docstring).
    seed: networks that draw at random while training (e.g. which attention map
      masks an image) read `self.make_rng('augment')`; its key is
      fold_in(key(seed), step), so a resumed run draws what it would have drawn.
    policy: the fgjax.impostor_policies.Policy whose `extend_batch` completes each
      batch from state.impostor_state, and whose `row_view` may hand the loss only
      the impostor rows the batch touches, which `update_rows` then trains at
      `impostor_learning_rate(step)`; None: neither.

  The batch holds 'label', 'index' (the example's own impostor), 'valid' (False rows
  weigh zero) and 'image' (normalised NHWC) or, for forward='heads', 'backbone'.
  """
  if forward not in FORWARDS:
    raise ValueError(f"forward={forward!r}; use one of {', '.join(FORWARDS)}.")
  net = network.module

  base_key = jax.random.key(seed)

  def outputs_and_stats(net_params, state, batch):
    variables = {"params": stop_frozen(net_params, frozen)}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    rngs = {"augment": jax.random.fold_in(base_key, state.step)}
    if forward == "heads":
      return network.head_apply(variables, batch["backbone"], train=True,
                                rngs=rngs), state.batch_stats
    if forward == "train" and state.batch_stats:
      outputs, mutated = net.apply(variables, batch["image"], train=True,
                                   mutable=["batch_stats"], rngs=rngs)
      return outputs, mutated["batch_stats"]
    return net.apply(variables, batch["image"], train=True,
                     backbone_train=False, rngs=rngs), state.batch_stats

  def update(state: train_state_lib.TrainState, batch: dict[str, Any]):
    view = None
    if policy is not None:
      batch = policy.extend_batch(state.impostor_state, batch)
      view = policy.row_view(state, batch)
    loss_batch = batch if view is None else view.batch

    def loss_fn(trainable, rows):
      outputs, new_stats = outputs_and_stats(trainable["net"], state, loss_batch)
      imps = state.with_trainable(trainable).impostors
      if view is not None:
        imps = view.impostors(imps, rows)
      loss, loss_state, metrics = objective(outputs, loss_batch, imps, state.loss_state)
      if "embedding" in outputs:
        metrics["embedding_norm"] = _largest_valid_norm(outputs["embedding"],
                                                        batch["valid"])
      return loss, (metrics, new_stats, loss_state)

    trainable = state.trainable()
    rows = None if view is None else jnp.take(state.impostors.centers, view.rows,
                                              axis=0, mode="clip")
    (grads, row_grads), (metrics, new_stats, loss_state) = jax.grad(
        loss_fn, argnums=(0, 1), has_aux=True)(trainable, rows)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm((grads, row_grads))
    new_state = state.with_trainable(trainable).replace(
        batch_stats=new_stats, opt_state=opt_state, loss_state=loss_state)
    if view is not None:
      new_state = policy.update_rows(new_state, view, row_grads,
                                     impostor_learning_rate(state.step))
    return new_state.replace(step=state.step + 1), metrics

  return update
