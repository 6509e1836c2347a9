"""A run's orbax checkpoints: where they live, how a TrainState comes back from them.

  manager = checkpoints.manager(workdir, config, total_steps)   # the training run's
  state = checkpoints.restore(manager, step, layout, abstract)  # on the run's layout

The restore target is the run's abstract state (fgjax.train_state.abstract) with the
impostor rows the checkpoint was written with: each device count pads M to its own
multiple (fgjax.train_state.Layout), so a run may resume on another device count, and
`layout.place` re-pads what comes back. Where the rows split evenly the target carries
their shardings, so orbax reads every device's rows straight into place.
"""

import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fgjax import init_from
from fgjax import train_state as train_state_lib


def manager(workdir: str, config=None, total_steps: Optional[int] = None
            ) -> ocp.CheckpointManager:
  """`workdir`'s checkpoint manager: the training run's (keeps 2, saves every
  config.train.checkpoint_every_steps, else at the end) or, without a config, a
  reader for `restore`."""
  options = None
  if config is not None:
    every = int(config.train.checkpoint_every_steps)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, save_interval_steps=every if every else total_steps + 1)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      item_handlers=ocp.StandardCheckpointHandler(),  # `restore` reads shapes
      options=options)


def restore(checkpoint_manager: ocp.CheckpointManager, step: int,
            layout: train_state_lib.Layout, abstract: train_state_lib.TrainState
            ) -> train_state_lib.TrainState:
  """Checkpoint `step` as a TrainState shaped like `abstract` (M impostor rows), on
  `layout`, whatever device count wrote it."""
  imps = checkpoint_manager.item_metadata(step).tree["params"].get("impostors")
  rows = int(imps["centers"].shape[0]) if imps else None
  target = layout.abstract(abstract, rows=rows)
  try:
    state = checkpoint_manager.restore(step, args=ocp.args.StandardRestore(target))
  except ValueError:
    # Checkpoints written before frozen impostor centers left the optimiser's tree
    # (and before impostor weights) hold entries the strict restore refuses.
    state = _restore_by_path(checkpoint_manager, step, target)
  return layout.place(state)


def _restore_by_path(checkpoint_manager: ocp.CheckpointManager, step: int, target):
  """Every array of `target` from checkpoint `step` by its path (extra entries of the
  checkpoint are ignored; a missing one is an error naming it)."""
  saved = init_from.flat(checkpoint_manager.restore(step,
                                                    args=ocp.args.StandardRestore()))
  missing = sorted(set(init_from.flat(target)) - set(saved))
  if missing:
    raise ValueError(f"checkpoint {step} in {checkpoint_manager.directory} lacks "
                     f"{missing[:5]} ({len(missing)} arrays) of this config's training "
                     "state; it belongs to another config: use a new --workdir.")
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.asarray(saved[init_from.path_key(path)], leaf.dtype), target)
