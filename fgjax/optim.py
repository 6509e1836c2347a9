"""The optimiser: Adam with weight decay, and masks for frozen leaves.

The paper trains with Adam and weight decay 5e-4 in PyTorch, whose `Adam(weight_decay=)`
adds `wd * w` to the gradient before the Adam moments (coupled L2, not AdamW); we mirror
that with `add_decayed_weights` before `scale_by_adam`. Frozen leaves (fixed impostors,
tied impostors between resets, backbone stages a CPU budget leaves untouched) go
through `optax.set_to_zero`, so they neither move nor decay, and Adam keeps no state
for them.
"""

from typing import Any

import jax
import optax

TRAIN, FROZEN, IMPOSTORS = "train", "frozen", "impostors"


def trainable_labels(params: Any, *, train_impostors: bool,
                     frozen_backbone_stages: frozenset[str]) -> Any:
  """Tree of 'train'/'frozen' labels matching `params` = {'net': ..., 'centers': ...}."""
  def net_label(path, _):
    top = path[0].key if path else None
    second = path[1].key if len(path) > 1 else None
    if top == "backbone" and (second in frozen_backbone_stages or
                              "*" in frozen_backbone_stages):
      return FROZEN
    return TRAIN
  labels = {"net": jax.tree_util.tree_map_with_path(net_label, params["net"])}
  if "centers" in params:
    labels["centers"] = TRAIN if train_impostors else FROZEN
  return labels


def make_optimizer(config, labels: Any,
                   total_steps: int) -> optax.GradientTransformation:
  """Adam(lr) with coupled weight decay on the trainable leaves, per `config.optim`."""
  o = config.optim
  if o.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate,
        warmup_steps=int(o.warmup_steps), decay_steps=max(int(total_steps), 2),
        end_value=o.learning_rate * o.final_lr_fraction)
  else:
    schedule = optax.constant_schedule(o.learning_rate)
  steps = []
  if o.grad_clip_norm:
    steps.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay:
    steps.append(optax.add_decayed_weights(o.weight_decay))
  steps += [optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)]
  train_tx = optax.chain(*steps)
  # Impostors are data-like parameters, not weights: no weight decay (it would drag
  # them toward the origin and shrink the scale protocol step 3 just set), and their
  # own learning-rate multiplier.
  impostor_tx = optax.chain(
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(
          lambda step: schedule(step) * o.impostor_lr_multiplier))
  labels = dict(labels)
  if labels.get("centers") == TRAIN:
    labels["centers"] = IMPOSTORS
  return optax.multi_transform(
      {TRAIN: train_tx, FROZEN: optax.set_to_zero(), IMPOSTORS: impostor_tx}, labels)
