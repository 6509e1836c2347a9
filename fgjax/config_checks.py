"""Validation of a training config before any compute.

Every error names the config field and says how to fix it, so a typo costs seconds,
not a failed job hours later. `validate` looks at the config alone; `check_compatible`
at what it builds (the network's outputs against the loss terms and the policy).
"""

import os
from typing import Any

from fgjax import impostor_policies
from fgjax import init_from
from fgjax import objectives
from fgjax import optim
from fgjax import schemes
from fgjax import search

SEARCH_BACKENDS = ("exact", "exact_knn", "scann")

# Fields that moved when the loss became a list of terms: a config that still sets
# them would otherwise add a key nothing reads.
_MOVED = {
    "impostors.sigma": "config.loss.nca.sigma",
    "impostors.attachment_weight": "config.loss.attachment.weight",
    "aux_loss": "config.loss.extra_terms ('center' or 'elope') with "
                "config.loss.<term>.weight / alpha / gamma / margin / normalize",
}


def _get(config: Any, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _has(config: Any, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _positive(config: Any, path: str, allow_zero: bool = False) -> None:
  value = _get(config, path)
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    raise ValueError(f"config.{path}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def _one_of(config: Any, path: str, allowed, empty_ok: bool = False) -> None:
  value = _get(config, path)
  if (empty_ok and value == "") or value in allowed:
    return
  raise ValueError(f"config.{path}={value!r} is unknown; use one of "
                   f"{', '.join(allowed)}" + (" (or '' for the scheme's)" if empty_ok
                                              else "") + ".")


def validate(config: Any) -> None:
  """Raises ValueError naming the first bad field of `config`."""
  # Late imports: the registries pull in flax model code.
  from fgjax import models
  from fgjax.models import nets
  from fgjax.models import pooling
  for old, new in _MOVED.items():
    if _has(config, old):
      raise ValueError(f"config.{old} no longer exists: it moved to {new}.")
  _one_of(config, "scheme", schemes.NAMES)
  _one_of(config, "model.backbone", models.names())
  _one_of(config, "model.net", nets.names(), empty_ok=True)
  _one_of(config, "model.pooling", pooling.names())
  _one_of(config, "impostors.policy", impostor_policies.names(), empty_ok=True)
  _one_of(config, "optim.schedule", optim.SCHEDULES)
  _one_of(config, "eval.search", SEARCH_BACKENDS)
  if _has(config, "eval.sigma_criterion"):
    from fgjax import evaluate  # pylint: disable=g-import-not-at-top
    _one_of(config, "eval.sigma_criterion", evaluate.SIGMA_CRITERIA)
  optim.parse_trainable(config.model.trainable)
  weights_path = config.model.get("weights_path") or ""
  if weights_path and not os.path.exists(weights_path):
    raise ValueError(f"config.model.weights_path={weights_path!r} does not exist; "
                     "point it at the .pth file or leave it empty to use the cache.")
  for path in ("model.embed_dim", "train.batch_size", "eval.batch_size",
               "input.image_size", "input.resize_size", "optim.learning_rate",
               "train.log_every_steps", "loss.nca.sigma", "model.pooling_k",
               "model.localizer_size", "model.localizer_map_size", "eval.k"):
    _positive(config, path)
  for path in ("train.num_epochs", "optim.weight_decay", "train.checkpoint_every_steps",
               "train.max_embedding_norm", "impostors.reset_every_epochs",
               "optim.warmup_steps", "optim.grad_clip_norm",
               "optim.impostor_lr_multiplier", "input.worker_count"):
    _positive(config, path, allow_zero=True)
  for path in ("model.localizer_tau", "optim.final_lr_fraction"):
    value = _get(config, path)
    if not 0 <= value <= 1:  # NaN fails too
      raise ValueError(f"config.{path}={value!r} must lie in [0, 1].")
  if config.input.image_size > config.input.resize_size:
    raise ValueError(
        f"config.input.image_size={config.input.image_size} is larger than "
        f"config.input.resize_size={config.input.resize_size}; the crop must fit.")
  grid = list(config.eval.sigma_grid)
  if any(s <= 0 for s in grid):
    raise ValueError(f"config.eval.sigma_grid={grid} has a value <= 0; sigmas must be > 0.")
  _validate_loss(config)
  _validate_bap(config)
  _validate_pq(config)
  _validate_knn(config)
  _validate_export(config)
  _validate_early_exit(config)
  _validate_rbf_svm(config)
  if config.get("init_from"):
    init_from.parse_parts(config.init_from_parts)
    if not os.path.isdir(os.path.join(config.init_from, "checkpoints")):
      raise ValueError(f"config.init_from={config.init_from!r} is not a workdir with "
                       "checkpoints; point it at a finished run's --workdir.")
  if config.train.cache_features and optim.parse_trainable(config.model.trainable)[0] \
      == "all":
    raise ValueError("config.train.cache_features=True needs config.model.trainable="
                     "'head' or 'last:N' (cached backbone outputs are only valid for "
                     "the blocks that do not train).")
  if config.train.get("feature_cache_dir") and not config.train.cache_features:
    raise ValueError(f"config.train.feature_cache_dir={config.train.feature_cache_dir!r} "
                     "is only used with config.train.cache_features=True (and "
                     "config.model.trainable='head' or 'last:N'); set both or leave it "
                     "empty.")


def _validate_loss(config: Any) -> None:
  """Known term names; each used term's section, a weight > 0, rates >= 0."""
  for field in ("terms", "extra_terms"):
    for name in schemes.split_names(config.loss[field]):
      if name not in objectives.names():
        raise ValueError(f"config.loss.{field} names {name!r}, which is not a loss "
                         f"term; use {', '.join(objectives.names())}.")
  for name in schemes.resolve(config).terms:
    if name not in config.loss:
      raise ValueError(f"config.loss.{name} is missing; configs/common.py has its "
                       "defaults.")
    for option in ("alpha", "gamma", "margin", "beta"):
      if option in config.loss[name]:
        _positive(config, f"loss.{name}.{option}", allow_zero=True)
    # A term with weight 0 is a silent no-op: almost always a forgotten flag.
    if not config.loss[name].weight > 0:
      raise ValueError(f"config.loss.{name}.weight={config.loss[name].weight!r}: a term "
                       "in the loss needs a weight > 0 (ELoPE eq. 1 uses 2.0 for "
                       f"'elope'); drop {name!r} from config.loss.terms / extra_terms "
                       "instead.")


def _validate_bap(config: Any) -> None:
  """The BAP networks' fields (fgjax/models/bap.py, coarse2fine.py), where present."""
  model = config.model
  if "attention_maps" in model:
    maps = model.attention_maps
    if isinstance(maps, bool) or not isinstance(maps, int) or maps < 1:
      raise ValueError(f"config.model.attention_maps={maps!r} must be an int >= 1 "
                       "(WS-DAN: 32; Coarse2Fine: 8).")
  for path in ("model.bap_scale", "model.upsampler_width"):
    if _has(config, path):
      _positive(config, path)
  for path in ("model.upsampler_pretrain_pairs", "model.upsampler_pretrain_epochs"):
    if _has(config, path):
      _positive(config, path, allow_zero=True)
  if _has(config, "model.c2f_mode"):
    from fgjax.models import coarse2fine  # pylint: disable=g-import-not-at-top
    _one_of(config, "model.c2f_mode", coarse2fine.MODES)
  # These passes run the backbone again on transformed images every step, which
  # cached backbone outputs cannot do.
  net = schemes.resolve(config).net
  needs_images = net == "c2f" or (net == "bap" and model.get("attention_crop_drop"))
  if needs_images and config.train.cache_features:
    what = ("net 'c2f' (its fine pass runs the backbone on the masked image)"
            if net == "c2f" else "config.model.attention_crop_drop (WS-DAN's crops and "
            "drops run the backbone again)")
    raise ValueError(f"config.train.cache_features=True cannot train {what}: set "
                     "config.train.cache_features=False (config.model.trainable='head' "
                     "still freezes the backbone).")


def _validate_export(config: Any) -> None:
  if not _has(config, "export"):  # Configs written before the int8 engine.
    return
  count = config.export.int8_calibration_images
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"config.export.int8_calibration_images={count!r} must be an int "
                     ">= 0 (training images to calibrate the int8 engine on; 0: none).")
  ops = config.export.int8_float_ops
  if isinstance(ops, str) or not all(isinstance(o, str) and o for o in ops):
    raise ValueError(f"config.export.int8_float_ops={ops!r} must be a tuple of ONNX op "
                     "type names, e.g. ('Sqrt', 'Div'), or ().")


def _validate_early_exit(config: Any) -> None:
  if not _has(config, "early_exit") or not config.early_exit.exits:
    return
  from fgjax.early_exit import heads  # pylint: disable=g-import-not-at-top
  from fgjax.early_exit import thresholds  # pylint: disable=g-import-not-at-top
  cfg = config.early_exit
  exits = cfg.exits
  if isinstance(exits, str) or not all(isinstance(e, str) and e for e in exits):
    raise ValueError(f"config.early_exit.exits={exits!r} must be a tuple of backbone "
                     "output names, e.g. ('stage4', 'stage6', 'map').")
  _one_of(config, "early_exit.head", heads.HEADS)
  _one_of(config, "early_exit.rule", thresholds.RULES)
  for path in ("early_exit.alpha",):
    value = _get(config, path)
    if not 0 <= value <= 1:
      raise ValueError(f"config.{path}={value!r} must lie in [0, 1].")
  if any(not 0 <= a <= 1 for a in cfg.alpha_grid):
    raise ValueError(f"config.early_exit.alpha_grid={tuple(cfg.alpha_grid)} has a "
                     "value outside [0, 1].")
  if not 0 < cfg.delta < 1:
    raise ValueError(f"config.early_exit.delta={cfg.delta!r} must lie in (0, 1): the "
                     "share of each class's training images that fits the exit heads.")
  _positive(config, "early_exit.C")
  _positive(config, "early_exit.sigma", allow_zero=True)


def _validate_rbf_svm(config: Any) -> None:
  """The RBF-SVM baseline's fields (fgjax/rbf_svm.py; configs written before it lack
  them)."""
  if not _has(config, "eval.rbf_svm"):
    return
  if not isinstance(config.eval.rbf_svm, bool):
    raise ValueError(f"config.eval.rbf_svm={config.eval.rbf_svm!r} must be True or "
                     "False.")
  for path in ("eval.rbf_svm_C_grid", "eval.rbf_svm_gamma_grid"):
    grid = _get(config, path)
    values = (grid,) if isinstance(grid, (str, bool)) else tuple(grid)
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
        for v in values):
      raise ValueError(f"config.{path}={grid!r} must be a non-empty tuple of numbers "
                       "> 0, e.g. (0.1, 1.0, 10.0).")
  from fgjax import rbf_svm  # pylint: disable=g-import-not-at-top
  _one_of(config, "eval.rbf_svm_normalize", rbf_svm.NORMALIZATIONS)


def _validate_pq(config: Any) -> None:
  pq_bytes = int(config.impostors.get("pq_bytes", 0))
  if not pq_bytes:
    return
  if schemes.resolve(config).policy == "none":
    raise ValueError(f"config.impostors.pq_bytes={pq_bytes} needs an impostor scheme "
                     f"(tied, fixed, loose), not config.scheme={config.scheme!r}.")
  if pq_bytes < 0 or config.model.embed_dim % pq_bytes:
    raise ValueError(f"config.impostors.pq_bytes={pq_bytes} must divide "
                     f"config.model.embed_dim={config.model.embed_dim} "
                     "(one 8-bit code per sub-vector).")


def _validate_knn(config: Any) -> None:
  """The k-NN policies' fields (configs written before them lack them)."""
  if not _has(config, "impostors.knn_k"):
    return
  for path, low in (("impostors.knn_k", 1), ("impostors.knn_refresh_every_steps", 0)):
    value = _get(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"config.{path}={value!r} must be an int >= {low}"
                       + (" (0: lists only from the initial embeddings)." if low == 0
                          else " (neighbours per training image; 64 by default)."))
  _one_of(config, "impostors.knn_backend", search.BACKENDS)
  weights = config.impostors.get("weights", False)
  if not isinstance(weights, bool):
    raise ValueError(f"config.impostors.weights={weights!r} must be True or False.")
  rate = config.impostors.get("weights_learning_rate", 1e-2)
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 10:
    raise ValueError(f"config.impostors.weights_learning_rate={rate!r} must be a number "
                     "in (0, 10), e.g. 1e-2.")


def check_compatible(resolved, network, objective, policy,
                     output_shapes: dict[str, Any], param_groups, frozen_groups) -> None:
  """Raises ValueError when the loss terms, the policy or config.model.frozen need what
  the network lacks."""
  unknown = sorted(set(frozen_groups) - set(param_groups))
  if unknown:
    raise ValueError(f"config.model.frozen names {unknown}, which network "
                     f"{network.name!r} does not have; its parameter groups are "
                     f"{', '.join(sorted(param_groups))}.")
  for term in objective.terms:
    for field in ("input", "fine_input"):  # fine_input: term 'attention_center'
      read = getattr(term, field, "")
      if read and read not in output_shapes:
        raise ValueError(
            f"config.loss.{term.name}.{field}={read!r} is not an output of network "
            f"{network.name!r} (outputs: {', '.join(sorted(output_shapes))}); "
            f"scheme {resolved.scheme!r} uses net {resolved.net!r}.")
  if objective.uses_impostors and not policy.uses_impostors:
    names = [t.name for t in objective.terms if t.uses_impostors]
    raise ValueError(f"loss terms {names} need impostors but config.impostors.policy "
                     f"resolves to {resolved.policy!r}; choose an impostor scheme or "
                     "policy (fixed, loose, tied).")
  read = {f for t in objective.terms for f in t.reads_batch_fields}
  unread = [f for f in policy.adds_batch_fields if f not in read]
  if unread:
    raise ValueError(f"impostor policy {resolved.policy!r} adds batch field(s) {unread} "
                     f"that no loss term in {[t.name for t in objective.terms]} reads; "
                     "add the term that uses them (term 'nca' reads 'neighbors') or "
                     "choose another policy.")
  if policy.weighted and not policy.uses_impostors:
    raise ValueError(f"config.impostors.weights=True weighs impostors, but "
                     f"config.impostors.policy resolves to {resolved.policy!r} (none); "
                     "choose an impostor scheme or set weights=False.")
  if policy.uses_impostors and network.embedding_layer is None:
    raise ValueError(f"impostor policy {resolved.policy!r} needs a network with an "
                     f"embedding layer; {network.name!r} has none (use "
                     "config.model.net='impostor' or 'convnet_extra').")
