"""Fitting exit heads and thresholds, and scoring sequential inference from features.

The paper's training algorithm (Savchenko 2021, "Sequential analysis in image
recognition", the algorithm after eq. 4), for exits m = 1..M over the N training
images' exit features x_{n;m}:
  1. split the training set per class with ratio delta (thresholds.holdout_split);
  2. fit exit m's classifier on the fit part, and collect for each held-out image the
     largest wrong-class score, max_{c != c(n)} s_m^(c)(x_{n;m});
  3. s_m = the score that floor(alpha_m (N - K)) of those exceed (eq. 4), with
     alpha_m = alpha m / M ("adaptive", Benjamini-Hochberg) or alpha ("fixed");
  4. refit exit m's classifier on all N.
`fit_exits` does 1, 2 and 4 once and keeps the held-out wrong-class scores, so the
thresholds of any (alpha, rule) cost a sort (`ExitFit.thresholds`). `simulate` applies
eq. (3) to precomputed per-exit scores - the same decisions `Sequential` takes while
running - so an alpha grid is scored without running the network again.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

from fgjax.early_exit import heads as heads_lib
from fgjax.early_exit import thresholds as thresholds_lib


@dataclasses.dataclass
class ExitFit:
  """Heads fitted on all N training images and the held-out wrong-class scores.

  Attributes:
    exits: the M exit names.
    heads: M ExitHeads (fitted on every training image, step 4).
    wrong_scores: M arrays (N - K,) of held-out max wrong-class scores (step 2).
  """
  exits: tuple[str, ...]
  heads: list[heads_lib.ExitHead]
  wrong_scores: list[np.ndarray]

  def thresholds(self, alpha: float, rule: str) -> np.ndarray:
    """(M,) s_m for this alpha and rule (eq. 4)."""
    return thresholds_lib.exit_thresholds(self.wrong_scores, alpha, rule)


def fit_exits(exits: Sequence[str], features: Sequence[np.ndarray], labels: np.ndarray,
              num_classes: int, *, kind: str, delta: float, seed: int,
              options: dict[str, Any]) -> ExitFit:
  """Steps 1, 2 and 4 for every exit.

  Args:
    exits: M exit names; features: M arrays (N, D_m) of l2-normalised exit features
      of the training images (fgjax.models.pooling.exit_features); labels: (N,) int.
    num_classes: C.
    kind: the exit classifier (heads.HEADS: 'svm', 'logreg', 'rbf').
    delta: the fit / held-out ratio of step 1.
    seed: the split's seed (and the classifiers').
    options: keyword options of heads.fit (C, sigma).
  """
  labels = np.asarray(labels)
  if len(features) != len(exits):
    raise ValueError(f"{len(features)} feature arrays for {len(exits)} exits.")
  fit_idx, held_idx = thresholds_lib.holdout_split(labels, delta, seed)
  if not len(held_idx):
    raise ValueError("the held-out part is empty (every class has one training image): "
                     "the thresholds need a held-out image per class; use a data set "
                     "with 2+ training images per class.")
  heads, wrong = [], []
  for f in features:
    head = heads_lib.fit(kind, f[fit_idx], labels[fit_idx], num_classes, seed=seed,
                         **options)
    scores = np.asarray(heads_lib.scores(head, f[held_idx]))
    wrong.append(thresholds_lib.wrong_class_max(scores, labels[held_idx]))
    heads.append(heads_lib.fit(kind, f, labels, num_classes, seed=seed, **options))
  return ExitFit(tuple(exits), heads, wrong)


def exit_scores(fit: ExitFit, features: Sequence[np.ndarray]) -> list[np.ndarray]:
  """M arrays (N, C): each exit head's scores on its features."""
  return [np.asarray(heads_lib.scores(h, f)) for h, f in zip(fit.heads, features)]


def simulate(scores: Sequence[np.ndarray], thresholds: np.ndarray) -> dict[str, np.ndarray]:
  """Eq. (3) on precomputed scores: {'exit' (N,), 'label' (N,)}.

  Image n answers at the first exit m with max_c scores[m][n, c] > thresholds[m]
  (strict), and at the last exit otherwise - as sequential.Sequential decides.
  """
  last = len(scores) - 1
  n = scores[0].shape[0]
  exit_at = np.full(n, last, np.int32)
  pending = np.ones(n, bool)
  for m in range(last):
    hit = pending & (scores[m].max(axis=1) > thresholds[m])
    exit_at[hit] = m
    pending &= ~hit
  label = np.stack([s.argmax(axis=1) for s in scores])[exit_at, np.arange(n)]
  return {"exit": exit_at, "label": label.astype(np.int32)}


def report(fit: ExitFit, scores: Sequence[np.ndarray], labels: np.ndarray,
           alphas: Sequence[float]) -> dict[str, Any]:
  """Top-1 of each exit alone and of sequential inference per (rule, alpha), with the
  fraction of images answered at each exit."""
  labels = np.asarray(labels)
  out: dict[str, Any] = {
      "exits": list(fit.exits),
      "exit_top1": {name: float((s.argmax(1) == labels).mean())
                    for name, s in zip(fit.exits, scores)},
      "sequential": []}
  for rule in thresholds_lib.RULES:
    for alpha in alphas:
      sim = simulate(scores, fit.thresholds(alpha, rule))
      out["sequential"].append({
          "rule": rule, "alpha": float(alpha),
          "top1": float((sim["label"] == labels).mean()),
          "exit_fraction": [float((sim["exit"] == m).mean())
                            for m in range(len(fit.exits))]})
  return out
