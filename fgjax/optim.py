"""The optimiser: Adam with weight decay, and masks for frozen leaves.

The paper trains with Adam and weight decay 5e-4 in PyTorch, whose `Adam(weight_decay=)`
adds `wd * w` to the gradient before the Adam moments (coupled L2, not AdamW); we mirror
that with `add_decayed_weights` before `scale_by_adam`. Frozen leaves (backbone blocks a
CPU budget leaves untouched, groups named in config.model.frozen) go through
`optax.set_to_zero`, so they neither move nor decay, and Adam keeps no state for them;
frozen impostor centers (fixed, tied, compressed_fixed) are no optimiser leaves at all
(fgjax.train_state.trainable_tree). Trainable impostors get their own learning-rate
multiplier and no decay; impostor log-weights (config.impostors.weights) their own
constant rate.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

TRAIN, FROZEN, IMPOSTORS, WEIGHTS = "train", "frozen", "impostors", "impostor_weights"
SCHEDULES = ("constant", "cosine")
_TRAINABLE_HELP = "'all', 'head' or 'last:N' (N >= 1 backbone blocks)"


def parse_trainable(value: str) -> tuple[str, int]:
  """config.model.trainable: 'all' -> ('all', 0), 'head' -> ('head', 0), 'last:3' ->
  ('last', 3); anything else is a ValueError naming the field."""
  if value in ("all", "head"):
    return value, 0
  if isinstance(value, str) and value.startswith("last:"):
    try:
      n = int(value.split(":", 1)[1])
    except ValueError:
      n = 0
    if n >= 1:
      return "last", n
  raise ValueError(f"config.model.trainable={value!r} is not valid; use "
                   f"{_TRAINABLE_HELP}.")


def cached_tail(config: Any) -> int:
  """N of config.model.trainable='last:N' with config.train.cache_features: the backbone
  blocks that train on cached outputs of the ones before them (fgjax.models.nets.build);
  0 otherwise."""
  mode, n = parse_trainable(config.model.trainable)
  return n if config.train.cache_features and mode == "last" else 0


def frozen_paths(trainable: str, blocks: Sequence[str],
                 groups: Sequence[str] = ()) -> frozenset[tuple[str, ...]]:
  """The network parameter subtrees that do not train, as path prefixes.

  Backbone blocks from config.model.trainable ('all' -> none, 'head' -> every block,
  'last:N' -> all but the last N of `blocks`, the backbone's top-level parameter groups
  in forward order), plus whole top-level groups from config.model.frozen (e.g.
  'embed', 'classifier' while only a localization module trains).
  """
  mode, n = parse_trainable(trainable)
  if mode == "last" and n > len(blocks):
    raise ValueError(f"config.model.trainable='last:{n}' but the backbone has only "
                     f"{len(blocks)} blocks: {list(blocks)}.")
  frozen = {"all": (), "head": tuple(blocks), "last": tuple(blocks[:-n] if n else ())}
  return frozenset({("backbone", b) for b in frozen[mode]} | {(g,) for g in groups})


def is_frozen(path: Sequence[str], frozen: frozenset[tuple[str, ...]]) -> bool:
  """Whether parameter `path` (names from the network params root) lies in `frozen`."""
  return any(tuple(path[:len(p)]) == p for p in frozen)


def trainable_labels(trainable: Any, *, train_impostors: bool,
                     frozen: frozenset[tuple[str, ...]]) -> Any:
  """Tree of optimiser labels matching `trainable` = {'net': ..., 'centers'?: ...}."""
  def net_label(path, _):
    return FROZEN if is_frozen([k.key for k in path], frozen) else TRAIN
  labels = {"net": jax.tree_util.tree_map_with_path(net_label, trainable["net"])}
  if "centers" in trainable:
    labels["centers"] = IMPOSTORS if train_impostors else FROZEN
  if "log_weights" in trainable:  # Learnable in every scheme (config.impostors.weights).
    labels["log_weights"] = WEIGHTS
  return labels


def learning_rate(config, total_steps: int) -> optax.Schedule:
  """The network's learning rate per step, per config.optim (schedule, warmup)."""
  o = config.optim
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate,
        warmup_steps=int(o.warmup_steps), decay_steps=max(int(total_steps), 2),
        end_value=o.learning_rate * o.final_lr_fraction)
  if o.schedule == "constant":
    return optax.constant_schedule(o.learning_rate)
  raise ValueError(f"config.optim.schedule={o.schedule!r} is unknown; use one of "
                   f"{', '.join(SCHEDULES)}.")


def impostor_learning_rate(config, total_steps: int) -> optax.Schedule:
  """The impostors' rate: the network's times config.optim.impostor_lr_multiplier."""
  schedule = learning_rate(config, total_steps)
  multiplier = float(config.optim.impostor_lr_multiplier)
  return lambda step: schedule(step) * multiplier


def make_optimizer(config, labels: Any,
                   total_steps: int) -> optax.GradientTransformation:
  """Adam(lr) with coupled weight decay on the trainable leaves, per `config.optim`."""
  o = config.optim
  schedule = learning_rate(config, total_steps)
  steps = []
  if o.grad_clip_norm:
    steps.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay:
    steps.append(optax.add_decayed_weights(o.weight_decay))
  steps += [optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)]
  # Impostors are data-like parameters, not weights: no weight decay (it would drag
  # them toward the origin and shrink the scale protocol step 3 just set), and their
  # own learning-rate multiplier.
  impostor_tx = optax.chain(
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(impostor_learning_rate(config, total_steps)))
  transforms = {TRAIN: optax.chain(*steps), FROZEN: optax.set_to_zero(),
                IMPOSTORS: impostor_tx}
  if WEIGHTS in jax.tree.leaves(labels):
    # Log-weights start at 0 and need O(1) moves whatever lr the network trains
    # with (1e-5 for fixed impostors on birds525): their own constant rate.
    transforms[WEIGHTS] = optax.adam(float(config.impostors.weights_learning_rate))
  return optax.multi_transform(transforms, labels)


def lazy_adam_rows(params: jax.Array, mu: jax.Array, nu: jax.Array, rows: jax.Array,
                   grads: jax.Array, count: jax.Array, learning_rate: jax.Array,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  """Adam on the listed rows of a matrix only; every other row and its moments stay.

  The update of `optax.scale_by_adam` + `scale_by_learning_rate` (Kingma & Ba, with
  bias correction by the global `count`) applied to rows `rows` of `params` (M, d)
  with their gradients `grads` (R, d): "lazy" Adam, as TensorFlow's LazyAdam and
  PyTorch's SparseAdam, so a step costs O(R d), not O(M d). A row that every step
  touches moves exactly as under dense Adam; a row a step does not touch keeps its
  moments instead of decaying them. Rows out of [0, M) are dropped (padding).

  Args:
    params, mu, nu: (M, d) parameters and Adam moments.
    rows: (R,) distinct row indices (or >= M: ignored).
    grads: (R, d) gradients of those rows.
    count: the step number t >= 1 of the bias correction.
    learning_rate: scalar.

  Returns:
    (params, mu, nu) with the rows updated.
  """
  take = lambda x: jnp.take(x, rows, axis=0, mode="clip")  # noqa: E731
  new_mu = b1 * take(mu) + (1 - b1) * grads
  new_nu = b2 * take(nu) + (1 - b2) * jnp.square(grads)
  t = jnp.asarray(count, grads.dtype)
  step = (new_mu / (1 - b1**t)) / (jnp.sqrt(new_nu / (1 - b2**t)) + eps)
  put = lambda x, v: x.at[rows].set(v.astype(x.dtype), mode="drop")  # noqa: E731
  return (put(params, take(params) - learning_rate * step), put(mu, new_mu),
          put(nu, new_nu))
