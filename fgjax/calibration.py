"""Calibration of predicted class distributions: NLL, ECE, reliability bins, temperature.

The impostor networks paper claims the RBF rule expresses uncertainty better than a
softmax head (section 4.2). These measure it on any (N, C) log-probabilities:

  nll(log_probs, labels)           mean -log p(true class)
  reliability(log_probs, labels)   expected calibration error (Guo et al. 2017, eq. 3:
                                   sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over equal-
                                   width confidence bins) and the bins themselves
  fit_temperature(logits, labels)  the T minimising the NLL of softmax(logits / T) on
                                   validation data (Guo et al. 2017, section 4.2), the
                                   fair softmax baseline for the RBF rule
"""

from typing import Any

import numpy as np

# Log-probabilities below this count as this in the NLL: a class the RBF rule gives
# exactly zero (no impostor within float range) would make the mean infinite.
_LOG_FLOOR = float(np.log(1e-12))


def _check(log_probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels)
  if log_probs.ndim != 2 or labels.shape != (log_probs.shape[0],):
    raise ValueError(f"expected (N, C) log-probabilities and (N,) labels, got "
                     f"{log_probs.shape} and {labels.shape}.")
  if len(labels) and not (labels.min() >= 0 and labels.max() < log_probs.shape[1]):
    raise ValueError(f"labels must lie in [0, {log_probs.shape[1]}).")
  return log_probs, labels.astype(np.int64)


def nll(log_probs: Any, labels: Any) -> float:
  """Mean negative log-likelihood of the true classes (log p floored at log 1e-12)."""
  log_probs, labels = _check(log_probs, labels)
  picked = log_probs[np.arange(len(labels)), labels]
  return float(-np.mean(np.maximum(picked, _LOG_FLOOR)))


def reliability(log_probs: Any, labels: Any, num_bins: int = 15) -> dict[str, Any]:
  """{'ece', 'nll', 'bins': [{'low', 'high', 'count', 'accuracy', 'confidence'}]}.

  Confidence is the top class's probability; bin b holds confidences in
  (b / B, (b + 1) / B] (the first bin includes 0). Empty bins report count 0 and
  accuracy / confidence None.
  """
  if num_bins < 1:
    raise ValueError(f"num_bins={num_bins} must be >= 1.")
  log_probs, labels = _check(log_probs, labels)
  confidence = np.exp(log_probs.max(axis=1))
  correct = log_probs.argmax(axis=1) == labels
  which = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  bins, ece = [], 0.0
  for b in range(num_bins):
    member = which == b
    count = int(member.sum())
    acc = float(correct[member].mean()) if count else None
    conf = float(confidence[member].mean()) if count else None
    if count:
      ece += count / len(labels) * abs(acc - conf)
    bins.append({"low": b / num_bins, "high": (b + 1) / num_bins, "count": count,
                 "accuracy": acc, "confidence": conf})
  return {"ece": float(ece), "nll": nll(log_probs, labels), "bins": bins}


def log_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
  """log softmax(logits / temperature) in float64."""
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(logits: Any, labels: Any) -> float:
  """The T in [0.01, 100] minimising the NLL of softmax(logits / T).

  A grid of 801 log-spaced values (steps of 1.2%), refined once around the best:
  deterministic, and the NLL is smooth and unimodal in log T for any fixed logits.
  """
  grid = np.logspace(-2, 2, 801)
  losses = [nll(log_softmax(logits, t), labels) for t in grid]
  best = int(np.argmin(losses))
  fine = np.logspace(np.log10(grid[max(best - 1, 0)]),
                     np.log10(grid[min(best + 1, len(grid) - 1)]), 41)
  return float(fine[int(np.argmin([nll(log_softmax(logits, t), labels)
                                    for t in fine]))])
