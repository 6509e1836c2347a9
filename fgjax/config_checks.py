"""Validation of a training config before any compute.

Every error names the config field and says how to fix it, so a typo costs seconds,
not a failed job hours later.
"""

import os
from typing import Any

from fgjax import schemes

_TRAINABLE_HELP = "'all', 'head' or 'last:N' (N >= 1 backbone stages)"
SEARCH_BACKENDS = ("exact", "exact_knn", "scann")


def parse_trainable(value: str) -> tuple[str, int]:
  """'all' -> ('all', 0), 'head' -> ('head', 0), 'last:3' -> ('last', 3)."""
  if value in ("all", "head"):
    return value, 0
  if isinstance(value, str) and value.startswith("last:"):
    try:
      n = int(value.split(":", 1)[1])
    except ValueError:
      n = 0
    if n >= 1:
      return "last", n
  raise ValueError(f"config.model.trainable={value!r} is not valid; use {_TRAINABLE_HELP}.")


def _positive(config: Any, path: str, allow_zero: bool = False) -> None:
  node = config
  for part in path.split("."):
    node = node[part]
  ok = node >= 0 if allow_zero else node > 0
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"config.{path}={node!r} must be {bound}.")


def validate(config: Any) -> None:
  """Raises ValueError naming the first bad field of `config`."""
  from fgjax import models  # Late import: the registry imports flax model code.
  if config.scheme not in schemes.NAMES:
    raise ValueError(f"config.scheme={config.scheme!r} is unknown; use one of "
                     f"{', '.join(schemes.NAMES)}.")
  known = models.names()
  if config.model.backbone not in known:
    raise ValueError(f"config.model.backbone={config.model.backbone!r} is unknown; "
                     f"use one of {', '.join(known)}.")
  parse_trainable(config.model.trainable)
  weights_path = config.model.get("weights_path") or ""
  if weights_path and not os.path.exists(weights_path):
    raise ValueError(f"config.model.weights_path={weights_path!r} does not exist; "
                     "point it at the .pth file or leave it empty to use the cache.")
  for path in ("model.embed_dim", "train.batch_size", "eval.batch_size",
               "input.image_size", "input.resize_size", "optim.learning_rate",
               "impostors.sigma", "train.log_every_steps"):
    _positive(config, path)
  for path in ("train.num_epochs", "optim.weight_decay", "train.checkpoint_every_steps",
               "impostors.attachment_weight", "impostors.reset_every_epochs"):
    _positive(config, path, allow_zero=True)
  if config.input.image_size > config.input.resize_size:
    raise ValueError(
        f"config.input.image_size={config.input.image_size} is larger than "
        f"config.input.resize_size={config.input.resize_size}; the crop must fit.")
  grid = list(config.eval.sigma_grid)
  if any(s <= 0 for s in grid):
    raise ValueError(f"config.eval.sigma_grid={grid} has a value <= 0; sigmas must be > 0.")
  if config.eval.search not in SEARCH_BACKENDS:
    raise ValueError(f"config.eval.search={config.eval.search!r} is unknown; use one of "
                     f"{', '.join(SEARCH_BACKENDS)}.")
  pq_bytes = int(config.impostors.get("pq_bytes", 0))
  if pq_bytes:
    if config.scheme in ("ce", "ce_extra"):
      raise ValueError(f"config.impostors.pq_bytes={pq_bytes} needs an impostor scheme "
                       f"(tied, fixed, loose), not config.scheme={config.scheme!r}.")
    if pq_bytes < 0 or config.model.embed_dim % pq_bytes:
      raise ValueError(f"config.impostors.pq_bytes={pq_bytes} must divide "
                       f"config.model.embed_dim={config.model.embed_dim} "
                       "(one 8-bit code per sub-vector).")
  _validate_aux_loss(config)
  if config.train.cache_features and parse_trainable(config.model.trainable)[0] != "head":
    raise ValueError("config.train.cache_features=True needs config.model.trainable="
                     "'head' (cached backbone features are only valid while the "
                     "backbone is frozen).")
  if config.train.get("feature_cache_dir") and not config.train.cache_features:
    raise ValueError(f"config.train.feature_cache_dir={config.train.feature_cache_dir!r} "
                     "is only used with config.train.cache_features=True (and "
                     "config.model.trainable='head'); set both or leave it empty.")


def _validate_aux_loss(config: Any) -> None:
  """config.aux_loss: a known name, non-negative rates, and a weight iff a loss is on."""
  aux = config.get("aux_loss")
  if aux is None:  # A config written before aux losses existed: none.
    return
  if aux.name not in schemes.AUX_NAMES:
    raise ValueError(f"config.aux_loss.name={aux.name!r} is unknown; use one of "
                     f"{', '.join(schemes.AUX_NAMES)}.")
  for path in ("aux_loss.weight", "aux_loss.alpha", "aux_loss.gamma",
               "aux_loss.margin"):
    _positive(config, path, allow_zero=True)
  # A weight without a loss (or a loss without a weight) is almost always a forgotten
  # flag; failing beats a run that silently trains without the intended term.
  if aux.name == "none" and aux.weight > 0:
    raise ValueError(f"config.aux_loss.weight={aux.weight!r} but config.aux_loss.name="
                     "'none'; set config.aux_loss.name to one of center, elope, or the "
                     "weight to 0.")
  if aux.name != "none" and aux.weight == 0:
    raise ValueError(f"config.aux_loss.name={aux.name!r} with config.aux_loss.weight=0 "
                     "adds nothing to the loss; set config.aux_loss.weight > 0 (ELoPE "
                     "eq. 1 uses lambda=2.0) or config.aux_loss.name='none'.")
