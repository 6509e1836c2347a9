"""RBF-SVM baseline on a run's pooled features (Lebedev et al., Impostor Networks, 4).

The paper's "RBF-SVM baseline" classifies "fixed feature vectors extracted from the
last hidden layer of ConvNet" with a Gaussian-kernel SVM (69.2% on Birds with
SqueezeNet, below the ConvNet and every impostor variant), to show that learning the
network and the impostors jointly is what helps. Here:

* Features: the network's 'features' output, the pooling's (N, F) output that the
  head's first layer reads (for the ConvNet on avg pooling, the backbone's pooled
  1280-d output; the ConvNet's last hidden layer). On a head-only run with
  `config.train.cache_features` they come from the feature cache, so the SVM costs no
  backbone pass; otherwise one evaluation pass per split with the trained variables.
* Normalisation (`config.eval.rbf_svm_normalize`): 'l2' (default) puts every image on
  the unit sphere, so the kernel compares directions and one gamma grid fits any
  backbone; 'standardize' gives each dimension the training split's zero mean and unit
  variance (BENCHMARKS.md, "RBF-SVM on frozen features", compares the two on val).
* Classifier: scikit-learn's `SVC(kernel='rbf')` (libsvm, one-vs-one),
  k(x, y) = exp(-gamma ||x - y||^2), fitted on the training split.
* Model selection on val only: every C of `rbf_svm_C_grid` times every gamma of
  `rbf_svm_gamma_grid` x gamma_scale, gamma_scale = 1 / (F Var(x_train)) being
  scikit-learn's gamma='scale' (gamma_scale ||x - y||^2 then averages at most 2 over
  pairs of training images whatever the feature scale; 1.1 on cars196's and 1.6 on
  birds525's l2-normalised Lite0 features). The best val top-1 wins; ties go
  to the first in grid order (C, then gamma, as listed). Test is scored once, for the
  chosen pair.
* Scores: the 'ovr'-shaped decision function, one-vs-one votes per class plus the
  summed pairwise confidences squashed into (-1/3, 1/3) as a tie-break; top-1 is its
  argmax (= `SVC(break_ties=True).predict`), top-5 its five highest.
"""

import dataclasses
import os
import time
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np
from sklearn import svm

from fgjax import evaluate
from fgjax import split_outputs
from fgjax import stats

NORMALIZATIONS = ("l2", "standardize")
# Rows of decision_function per call: it builds a (rows, C (C - 1) / 2) one-vs-one
# array first (525 classes: 137,550 pairs, 280 MB of float64 at 256 rows).
_SCORE_BLOCK = 256
# The network output the SVM reads (fgjax.models.nets.PooledNet.head, bap.py).
FEATURES = "features"
PREDICTIONS_FILE = "rbf_svm_predictions.npz"


def normalize(x: np.ndarray, how: str, train: np.ndarray) -> np.ndarray:
  """Features (N, F) normalised per `how`, as float64.

  'l2': each row divided by its L2 norm (zero rows stay zero). 'standardize':
  (x - mean) / std with the mean and std (F,) of `train` (M, F), the training
  features; constant dimensions are only centred.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be (N, F), got shape {x.shape}.")
  if how == "l2":
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
  if how == "standardize":
    train = np.asarray(train, np.float64)
    std = train.std(axis=0)
    return (x - train.mean(axis=0)) / np.where(std > 0, std, 1.0)
  raise ValueError(f"normalisation {how!r} is unknown; use one of "
                   f"{', '.join(NORMALIZATIONS)} (config.eval.rbf_svm_normalize).")


def gamma_scale(x: np.ndarray) -> float:
  """scikit-learn's gamma='scale' of training features x (M, F): 1 / (F Var(x))."""
  x = np.asarray(x, np.float64)
  var = float(x.var())
  if not var > 0:
    raise ValueError("every training feature is the same: the RBF kernel has no scale.")
  return 1.0 / (x.shape[1] * var)


def class_scores(model: svm.SVC, x: np.ndarray, num_classes: int) -> np.ndarray:
  """(N, num_classes) scores of a fitted SVC (module docstring); classes the model
  never saw in training score -inf, so they rank last."""
  out = np.full((len(x), num_classes), -np.inf)
  classes = np.asarray(model.classes_)
  for start in range(0, len(x), _SCORE_BLOCK):
    d = model.decision_function(x[start:start + _SCORE_BLOCK])
    if len(classes) == 2:  # The binary margin comes as (N,), > 0 meaning classes[1].
      d = np.stack([-d, d], axis=1)
    out[start:start + _SCORE_BLOCK, classes] = d
  return out


@dataclasses.dataclass
class Selection:
  """The SVM chosen on val and the table it was chosen from.

  Attributes:
    model: the fitted SVC of the chosen pair.
    C, gamma: its parameters; gamma_multiplier: gamma / gamma_scale.
    gamma_scale: 1 / (F Var(x_train)) of the normalised training features.
    table: one row per grid point, in grid order: C, gamma_multiplier, gamma,
      val_top1, val_top5, n_support.
  """
  model: svm.SVC
  C: float
  gamma: float
  gamma_multiplier: float
  gamma_scale: float
  table: list[dict[str, float]]


def fit_and_select(train_x: np.ndarray, train_y: np.ndarray,
                   val_x: Optional[np.ndarray], val_y: Optional[np.ndarray], *,
                   C_grid: Sequence[float], gamma_grid: Sequence[float],
                   num_classes: int) -> Selection:
  """Fits SVC(kernel='rbf') for each (C, gamma_multiplier x gamma_scale) on the
  training features and keeps the one with the best val top-1 (ties: grid order).

  Args:
    train_x: (M, F) normalised training features; train_y: (M,) int labels.
    val_x, val_y: (V, F), (V,) the same for val; None is allowed only for a grid of
      one point (there is then nothing to choose).
    C_grid: SVC's C values (> 0).
    gamma_grid: multipliers (> 0) of gamma_scale(train_x).
    num_classes: C of the data set (for the val scores).
  """
  grid = [(float(c), float(m)) for c in C_grid for m in gamma_grid]
  if not grid:
    raise ValueError("the RBF-SVM grid is empty: config.eval.rbf_svm_C_grid and "
                     "config.eval.rbf_svm_gamma_grid each need a value.")
  if val_x is None and len(grid) > 1:
    raise ValueError(f"choosing among {len(grid)} (C, gamma) pairs needs a val split; "
                     "the data has none (config.data.split): give "
                     "config.eval.rbf_svm_C_grid and rbf_svm_gamma_grid one value each.")
  scale = gamma_scale(train_x)
  table, best = [], None
  for c, multiplier in grid:
    model = svm.SVC(kernel="rbf", C=c, gamma=multiplier * scale).fit(train_x, train_y)
    row = {"C": c, "gamma_multiplier": multiplier, "gamma": multiplier * scale,
           "n_support": int(model.n_support_.sum())}
    if val_x is not None:
      acc = evaluate.topk_accuracy(class_scores(model, val_x, num_classes), val_y)
      row.update(val_top1=acc["top1"], val_top5=acc["top5"])
    logging.info("RBF-SVM %s", row)
    table.append(row)
    if best is None or row.get("val_top1", 0.0) > best[0].get("val_top1", 0.0):
      best = (row, model)
  row, model = best
  return Selection(model=model, C=row["C"], gamma=row["gamma"],
                   gamma_multiplier=row["gamma_multiplier"], gamma_scale=scale,
                   table=table)


def for_run(run: Any, variables: dict[str, Any],
            workdir: Optional[str] = None) -> dict[str, Any]:
  """The baseline on a trained run (fgjax.train `_evaluate`, config.eval.rbf_svm).

  Reads the network's 'features' output of the train, val and test splits, fits and
  selects per `fit_and_select` with the config.eval.rbf_svm_* fields, and scores val
  and test with the chosen SVM. With a `workdir`, writes each split's labels and
  top-1 classes ('<split>_label', '<split>_rbf_svm') to PREDICTIONS_FILE there, the
  input of a paired test against another run's predictions.npz (fgjax.stats.mcnemar).

  Returns:
    The results.json section: the grid and val table, the chosen C / gamma, and
    {'splits': {split: {'top1', 'top5', 'top1_se'}}} (binomial standard error).
  """
  start = time.time()
  cfg = run.config.eval
  if FEATURES not in run.output_shapes:
    raise ValueError(f"config.eval.rbf_svm=True reads the network's {FEATURES!r} "
                     f"output, which net {run.network.name!r} does not have (outputs: "
                     f"{', '.join(sorted(run.output_shapes))}).")
  out = split_outputs.per_split(run.outputs, variables, (FEATURES,),
                                ("train", "val", "test"))
  if "train" not in out:
    raise ValueError("config.eval.rbf_svm=True needs a training split to fit on.")
  how = cfg.rbf_svm_normalize
  train_raw = out["train"][FEATURES]
  x = {s: normalize(o[FEATURES], how, train_raw) for s, o in out.items()}
  y = {s: np.asarray(o["label"]) for s, o in out.items()}
  chosen = fit_and_select(x["train"], y["train"], x.get("val"), y.get("val"),
                          C_grid=cfg.rbf_svm_C_grid, gamma_grid=cfg.rbf_svm_gamma_grid,
                          num_classes=run.num_classes)
  report: dict[str, Any] = {
      "features": FEATURES, "feature_dim": int(train_raw.shape[1]), "normalize": how,
      "train_images": int(len(train_raw)), "C_grid": [float(c) for c in
                                                      cfg.rbf_svm_C_grid],
      "gamma_grid": [float(g) for g in cfg.rbf_svm_gamma_grid],
      "gamma_scale": chosen.gamma_scale, "val_table": chosen.table,
      "selected_on": "val top1" if "val" in x else "none (one grid point)",
      "C": chosen.C, "gamma": chosen.gamma, "gamma_multiplier": chosen.gamma_multiplier,
      "n_support": int(chosen.model.n_support_.sum()), "splits": {}}
  arrays = {}
  for split in ("val", "test"):
    if split not in x:
      continue
    scores = class_scores(chosen.model, x[split], run.num_classes)
    acc = evaluate.topk_accuracy(scores, y[split], (1, 5))
    acc["top1_se"] = stats.binomial_se(acc["top1"], len(y[split]))
    acc["num_examples"] = int(len(y[split]))
    report["splits"][split] = acc
    arrays[f"{split}_label"] = y[split].astype(np.int32)
    arrays[f"{split}_rbf_svm"] = scores.argmax(axis=1).astype(np.int32)
  if workdir is not None:
    np.savez(os.path.join(workdir, PREDICTIONS_FILE), **arrays)
    report["predictions"] = PREDICTIONS_FILE
  report["seconds"] = time.time() - start
  logging.info("RBF-SVM C=%g gamma=%g (x%g scale): %s", chosen.C, chosen.gamma,
               chosen.gamma_multiplier, report["splits"])
  return report
