"""Evaluation: RBF rule over impostors (eq. 3), softmax accuracy, sigma selection.

Embeddings are computed once per split on the accelerator; the classifiers then run on
them, so a sweep over sigma costs no extra forward passes.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import calibration
from fgjax import impostors as impostors_lib

SIGMA_CRITERIA = ("top1", "nll")


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Fraction of rows whose label is among the k highest scores, per k.

  Args:
    scores: (N, C) logits, probabilities or log-probabilities (any monotone score).
    labels: (N,) int.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  order = np.argsort(-scores, axis=1, kind="stable")
  out = {}
  for k in ks:
    k_eff = min(k, scores.shape[1])
    hit = (order[:, :k_eff] == labels[:, None]).any(axis=1)
    out[f"top{k}"] = float(hit.mean()) if len(labels) else float("nan")
  return out


def rbf_log_probs(embeddings: np.ndarray, impostors: impostors_lib.ImpostorSet,
                  sigma: float, num_classes: int, *, search: str = "exact",
                  k: int = 0, query_chunk: int = 1024) -> np.ndarray:
  """Eq. (3) for every embedding: exhaustively over all impostors, or over k neighbours.

  Args:
    embeddings: (N, E) query embeddings.
    impostors: ImpostorSet with centers (M, E), labels (M,).
    sigma: kernel width of eq. (2).
    num_classes: C.
    search: 'exact' (all M impostors; the paper's evaluation), or a
      fgjax.search backend ('exact_knn', 'scann') used with the k nearest impostors.
    k: neighbours for the k-NN backends.
  Returns:
    (N, C) log-probabilities.
  """
  if search == "exact":
    fn = jax.jit(impostors_lib.rbf_log_probs, static_argnames=("num_classes",))
    out = [np.asarray(fn(jnp.asarray(embeddings[i:i + query_chunk]), impostors,
                         sigma, num_classes=num_classes))
           for i in range(0, len(embeddings), query_chunk)]
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)
  from fgjax import search as search_lib  # ScaNN is only loaded when asked for.
  backend = {"exact_knn": "exact"}.get(search, search)
  index = search_lib.build_index(np.asarray(impostors.centers), backend=backend)
  k = min(k or 64, index.size)
  sq_dists, idx = index.search(np.asarray(embeddings, np.float32), k)
  return np.asarray(impostors_lib.rbf_log_probs_from_neighbors(
      jnp.asarray(sq_dists), jnp.asarray(idx), jnp.asarray(impostors.labels), sigma,
      num_classes, log_weights=impostors.log_weights))


def select_sigma(embeddings: np.ndarray, labels: np.ndarray,
                 impostors: impostors_lib.ImpostorSet, grid: Sequence[float],
                 num_classes: int, criterion: str = "top1"
                 ) -> tuple[float, dict[str, float]]:
  """Picks the sigma of `grid` best on (validation) embeddings by `criterion`.

  'top1': the highest top-1 accuracy, ties to the larger sigma (smoother
  probabilities); 'nll': the lowest negative log-likelihood (the calibrated choice).
  Returns the chosen sigma and {str(sigma): top-1 or NLL} for the record.
  """
  if not grid:
    raise ValueError("config.eval.sigma_grid is empty; give at least one sigma > 0.")
  if criterion not in SIGMA_CRITERIA:
    raise ValueError(f"config.eval.sigma_criterion={criterion!r}; use one of "
                     f"{', '.join(SIGMA_CRITERIA)}.")
  table = {}
  for sigma in sorted(grid):
    lp = rbf_log_probs(embeddings, impostors, sigma, num_classes)
    table[repr(float(sigma))] = (topk_accuracy(lp, labels, (1,))["top1"]
                                 if criterion == "top1" else calibration.nll(lp, labels))
  if criterion == "top1":
    best = max(sorted(grid), key=lambda s: (table[repr(float(s))], s))
  else:
    best = min(sorted(grid), key=lambda s: (table[repr(float(s))], -s))
  return float(best), table


def classify_split(outputs: dict[str, np.ndarray], *,
                   impostors: Optional[impostors_lib.ImpostorSet], sigma: float,
                   num_classes: int, search: str = "exact", k: int = 0,
                   ks: Sequence[int] = (1, 5),
                   temperature: Optional[float] = None,
                   predictions: Optional[dict[str, np.ndarray]] = None
                   ) -> dict[str, Any]:
  """All accuracies of one split (RBF over impostors and/or the softmax head) and
  their calibration (fgjax.calibration: ECE, NLL, reliability bins) under
  'calibration'; with `temperature`, also the softmax divided by it
  ('softmax_temperature'). `predictions`, when given, receives each head's top-1
  class per image ({'rbf': (N,), 'softmax': (N,)}), what a paired test of two runs
  compares."""
  labels = outputs["label"]
  result: dict[str, Any] = {"num_examples": int(len(labels)), "calibration": {}}
  if impostors is not None:
    lp = rbf_log_probs(outputs["embedding"], impostors, sigma, num_classes,
                       search=search, k=k)
    result["rbf"] = topk_accuracy(lp, labels, ks)
    if predictions is not None:
      predictions["rbf"] = np.asarray(lp).argmax(-1).astype(np.int32)
    result["rbf_mean_entropy"] = float(np.mean(entropy(lp)))
    result["calibration"]["rbf"] = calibration.reliability(lp, labels)
  if "logits" in outputs:
    logits = outputs["logits"]
    result["softmax"] = topk_accuracy(logits, labels, ks)
    if predictions is not None:
      predictions["softmax"] = np.asarray(logits).argmax(-1).astype(np.int32)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    result["softmax_mean_entropy"] = float(np.mean(entropy(np.asarray(log_probs))))
    result["calibration"]["softmax"] = calibration.reliability(log_probs, labels)
    if temperature is not None:
      result["calibration"]["softmax_temperature"] = calibration.reliability(
          calibration.log_softmax(logits, temperature), labels)
  return result


def entropy(log_probs: np.ndarray) -> np.ndarray:
  """Natural-log entropy of each row of (N, C) log-probabilities, as NumPy."""
  return np.asarray(impostors_lib.entropy_from_log_probs(jnp.asarray(log_probs)))
