"""What a training workdir guarantees: one config per workdir, atomic files, clean logs.

* `write_json` is fgjax's one JSON writer: write to a temporary file, then rename, so a
  crash never leaves a half-written file that a reader would trust.
* `check_config` runs before anything in a workdir is written or computed. A workdir
  that holds another run's config.json may only be reused for the same experiment:
  a change that alters what is trained (scheme, network, pooling, embed_dim, batch
  size, loss terms, data set or split, learning rate, ...) is an error that lists every
  changed field and says how to start fresh; the fields in HARMLESS (how long to
  train with a constant learning rate, logging, checkpoint interval, evaluation,
  loader workers, device count) may change, and each change is logged.
* `truncate_metrics` drops the rows of metrics.jsonl after the step a run resumes
  from, which the resumed run logs again, so every step appears once.
"""

import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"

# Fields (or whole sections, ending in '.') that may differ from the run that created
# the workdir. num_epochs / num_steps only while the learning rate is constant: a
# cosine schedule decays over the total number of steps.
HARMLESS = ("train.log_every_steps", "train.checkpoint_every_steps",
            "train.max_embedding_norm",
            "train.feature_cache_dir", "input.worker_count", "eval.", "export.",
            "early_exit.", "data.unknown_root",
            "num_devices", "distributed", "coordinator_address", "num_processes",
            "process_id")
_LENGTH = ("train.num_epochs", "train.num_steps")
# Fields added after workdirs were written, with the value that reproduces what those
# runs did: absent from an old config.json and equal to this in the new config, they
# are no change. (loss.<term> sections are read only when the term is in the loss.)
_ADDED_LATER = {"model.exit_stages": [], "loss.exit_ce.weight": None,
                "loss.exit_ce.input": None,
                # Read only by the k-NN impostor policies (knn, knn_loose).
                **{f"impostors.{f}": None for f in (
                    "knn_k", "knn_refresh_every_steps", "knn_backend")},
                "impostors.weights": False, "impostors.weights_learning_rate": None,
                # Read only by the BAP networks (bap, bap_impostor, c2f).
                **{f"model.{f}": None for f in (
                    "attention_maps", "bap_scale", "attention_orthogonal_init",
                    "attention_crop_drop", "c2f_mode", "upsampler_width",
                    "upsampler_pretrain_pairs", "upsampler_pretrain_epochs")},
                **{f"loss.{t}.{f}": None for t in ("ce_fine", "ce_crop", "ce_drop")
                   for f in ("weight", "input")},
                **{f"loss.attention_center.{f}": None for f in (
                    "weight", "input", "beta", "normalize_center", "fine_input")}}


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON atomically (temporary file + rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, (np.ndarray, jax.Array)):
    return np.asarray(o).tolist()
  return str(o)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  # JSON turns tuples into lists; compare in the JSON form.
  return {prefix[:-1]: json.loads(json.dumps(tree, default=_json_default))}


def _harmless(field: str, new: dict[str, Any], old_value: Any = None) -> bool:
  if old_value == "(absent)" and field in _ADDED_LATER:
    off = _ADDED_LATER[field]
    return off is None or new.get(field) == off
  if field in _LENGTH:
    return new.get("optim.schedule", "constant") == "constant"
  return any(field == h or (h.endswith(".") and field.startswith(h)) for h in HARMLESS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list, list]:
  """([(field, old, new)] incompatible, [(field, old, new)] harmless) differences."""
  a, b = _flatten(old), _flatten(new)
  bad, fine = [], []
  for field in sorted(set(a) | set(b)):
    va, vb = a.get(field, "(absent)"), b.get(field, "(absent)")
    if va != vb:
      (fine if _harmless(field, b, va) else bad).append((field, va, vb))
  return bad, fine


def check_config(workdir: str, config_dict: dict[str, Any]) -> bool:
  """Raises ValueError if `workdir` belongs to an incompatible config.

  Returns True when the workdir already holds a run of this experiment (resume),
  False for a new workdir. Reads only; writes nothing.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  try:
    old = read_json(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({e}); it names the config of the run in "
                     f"this workdir. Use a new --workdir, or delete {workdir} to start "
                     "fresh.") from e
  bad, fine = config_changes(old, config_dict)
  if bad:
    lines = "\n".join(f"  config.{f}: {va!r} -> {vb!r}" for f, va, vb in bad)
    raise ValueError(
        f"{workdir} holds a run with another config, so it cannot resume with this "
        f"one; changed:\n{lines}\nNothing was written. Start fresh with a new "
        f"--workdir (or delete {workdir}), or run with the config of {path}.")
  for f, va, vb in fine:
    logging.warning("Resuming %s with config.%s changed: %r -> %r.", workdir, f, va, vb)
  return True


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps the rows of metrics.jsonl with step <= `step` (atomically)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError):
      continue  # A line cut by a crash mid-write.
  if len(keep) == len(lines):
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
