"""Start a run from another run's final checkpoint: `config.init_from=WORKDIR`.

Two-stage recipes need it: ELoPE fine-tunes a trained k-max model with weighted k-max
pooling for 30 more epochs (section 6), a localization module trains on top of a frozen
classifier, an early-exit head on top of a trained network.

`config.init_from_parts` (comma-separated) says what is taken from WORKDIR's latest
checkpoint:
  net         the network params and BatchNorm statistics (always needed);
  impostors   the impostor set and the impostor policy's state (protocol steps 2-3
              are then skipped); otherwise the impostors are recomputed from the
              loaded network's embeddings;
  loss_state  the loss terms' state (class means), for the terms both runs have.
The optimiser state and the step are never taken: the new run starts at step 0.

Matching is by parameter path. A parameter the source lacks keeps its fresh
initialisation (logged: e.g. 'pool/weights' when a weighted k-max run starts from a
k-max run); a source parameter the new network lacks is ignored (logged); a parameter
whose shape differs is an error that names it. A run that resumes from its own
checkpoints ignores init_from: its own state wins.
"""

import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PARTS = ("net", "impostors", "loss_state")


def parse_parts(value: str) -> tuple[str, ...]:
  parts = tuple(p.strip() for p in str(value).split(",") if p.strip())
  bad = [p for p in parts if p not in PARTS]
  if bad or "net" not in parts:
    raise ValueError(f"config.init_from_parts={value!r}: use a comma-separated subset "
                     f"of {', '.join(PARTS)} that includes 'net'.")
  return parts


def stamp(workdir: str) -> list:
  """[absolute path, latest step, its mtime]: what identifies the loaded checkpoint."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = sorted(int(p) for p in os.listdir(path) if p.isdigit()) if os.path.isdir(
      path) else []
  if not steps:
    return [path, None, None]
  return [path, steps[-1], int(os.stat(os.path.join(path, str(steps[-1]))).st_mtime)]


def load(workdir: str) -> dict[str, Any]:
  """The latest checkpoint of `workdir` as nested dicts of NumPy arrays."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from={workdir!r} has no checkpoints/ folder; "
                            "point it at the workdir of a finished run.")
  manager = ocp.CheckpointManager(path)
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f"config.init_from={workdir!r}: {path} holds no checkpoint.")
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  logging.info("init_from: loaded %s at step %d.", workdir, step)
  return jax.tree.map(np.asarray, restored)


def path_key(path) -> str:
  """'a/b/0/c' for a pytree key path: the same for a pytree and its checkpoint's
  nested dicts (named tuples and dataclasses become dicts there)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def flat(tree: Any) -> dict[str, Any]:
  """{path_key: leaf} of every array leaf of `tree`."""
  return {path_key(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge(target: Any, source: Any, what: str) -> Any:
  """`target` with every leaf that `source` has at the same path and shape replaced.

  Raises:
    ValueError: a leaf of both has different shapes (names `what`/path and the shapes).
  """
  src = flat(source)
  tgt = flat(target)
  for path, leaf in tgt.items():
    if path in src and np.shape(src[path]) != np.shape(leaf):
      raise ValueError(
          f"config.init_from: {what}/{path} has shape {np.shape(src[path])} in the "
          f"source run but {np.shape(leaf)} in this one; the two networks differ there "
          "(backbone, embed_dim, pooling_k or num_classes). Use a source run with the "
          "same shapes, or leave this part out of config.init_from_parts.")
  kept = sorted(set(tgt) - set(src))
  dropped = sorted(set(src) - set(tgt))
  if kept:
    logging.warning("init_from: %s not in the source run, kept from this network's own "
                    "initialisation: %s", what, ", ".join(kept))
  if dropped:
    logging.warning("init_from: %s of the source run not used: %s", what,
                    ", ".join(dropped))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.asarray(src.get(path_key(path), leaf), np.asarray(leaf).dtype),
      target)
