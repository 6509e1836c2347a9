"""Early exits for a trained run: fitted after training, evaluated, exported.

With `config.early_exit.exits` set (backbone output names in forward order, e.g.
('stage4', 'stage6', 'map') for EfficientNet-Lite0: two intermediate stages and the
penultimate layer, as the paper does), fgjax.train calls `fit_for_run` after the
network is trained: one pass over every split computes the exit features of every
image (fgjax.models.pooling.exit_features), the exit heads and the held-out
wrong-class scores are fitted on the training split (fit.fit_exits), and val / test
are scored per exit and for sequential inference over `alpha_grid` with both rules
(fit.report). The artifact gets the heads and the thresholds of the configured
`alpha` and `rule`, which `fgjax.predict --early_exit` runs.

The exit heads see the network's backbone as trained (frozen here): this is the
paper's "pre-trained" setting, fitted after training, so a finished workdir gets exits
by rerunning launch.py with the early_exit fields set (they do not change training).
"""

from typing import Any

import numpy as np

from fgjax.early_exit import fit as fit_lib
from fgjax.early_exit import thresholds as thresholds_lib
from fgjax.models import pooling


def backbone_variables(variables: dict[str, Any]) -> dict[str, Any]:
  """The backbone's own collections of a network's variables."""
  out = {col: tree["backbone"] for col, tree in variables.items()
         if isinstance(tree, dict) and "backbone" in tree}
  if "params" not in out:
    raise ValueError("early exits need a network with a `backbone` submodule; its "
                     "variables have no 'backbone' params.")
  return out


def check_config(cfg: Any, backbone_outputs: tuple[str, ...]) -> tuple[str, ...]:
  """The configured exits, checked against the backbone's outputs and forward order."""
  exits = tuple(cfg.exits)
  unknown = [e for e in exits if e not in backbone_outputs]
  if unknown:
    raise ValueError(f"config.early_exit.exits names {unknown}, not outputs of the "
                     f"backbone; its outputs are {', '.join(backbone_outputs)}.")
  order = [backbone_outputs.index(e) for e in exits]
  if order != sorted(set(order)):
    raise ValueError(f"config.early_exit.exits={exits} must be distinct and in forward "
                     f"order ({', '.join(backbone_outputs)}).")
  if cfg.rule not in thresholds_lib.RULES:
    raise ValueError(f"config.early_exit.rule={cfg.rule!r}; use one of "
                     f"{', '.join(thresholds_lib.RULES)}.")
  return exits


def _options(cfg: Any) -> dict[str, Any]:
  if cfg.head == "rbf":
    return {"sigma": float(cfg.sigma) if cfg.sigma else None}
  return {"C": float(cfg.C)}


def fit_for_run(run: Any, variables: dict[str, Any]) -> tuple[dict[str, Any],
                                                              dict[str, Any]]:
  """(results, export) of the run's early exits: results for results.json, export
  for fgjax.artifact.export(early_exit=...)."""
  cfg = run.config.early_exit
  backbone = run.network.module.backbone
  exits = check_config(cfg, tuple(run.network.spec.outputs))
  bvars = backbone_variables(variables)

  def features(v, x):
    out = backbone.apply(v, x, train=False, stop=exits[-1])
    return {e: pooling.exit_features(out[e]) for e in exits}

  splits = [s for s in ("train", "val", "test") if run.outputs.has(s)]
  feats = {s: run.outputs.mapped(features, bvars, s) for s in splits}
  fitted = fit_lib.fit_exits(
      exits, [feats["train"][e] for e in exits], feats["train"]["label"],
      run.num_classes, kind=cfg.head, delta=float(cfg.delta), seed=int(run.config.seed),
      options=_options(cfg))
  thresholds = fitted.thresholds(float(cfg.alpha), cfg.rule)
  results: dict[str, Any] = {
      "head": cfg.head, "alpha": float(cfg.alpha), "rule": cfg.rule,
      "thresholds": [float(t) for t in thresholds],
      "held_out_images": int(len(fitted.wrong_scores[0]))}
  for split in splits[1:]:
    scores = fit_lib.exit_scores(fitted, [feats[split][e] for e in exits])
    results[split] = fit_lib.report(fitted, scores, feats[split]["label"],
                                    list(cfg.alpha_grid))
    sim = fit_lib.simulate(scores, thresholds)
    results[split]["configured"] = {
        "top1": float(np.mean(sim["label"] == feats[split]["label"])),
        "exit_fraction": [float(np.mean(sim["exit"] == m)) for m in range(len(exits))]}
  export = {"exits": list(exits), "kind": cfg.head, "alpha": float(cfg.alpha),
            "rule": cfg.rule, "thresholds": [float(t) for t in thresholds],
            "heads": fitted.heads}
  return results, export
