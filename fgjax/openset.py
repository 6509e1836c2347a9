"""Open-set recognition from prediction entropy (impostor networks, Sec. 4.2).

Lebedev et al., "Impostor Networks for Fast Fine-Grained Recognition", Sec. 4.2
and Fig. 4: a network trained on known classes (birds) is run on a known test
set and on images of unseen classes (non-birds); the entropy of the predicted
class distribution is higher on unseen classes for RBF/impostor classifiers,
and the two entropy histograms are compared with the Kolmogorov-Smirnov
distance. This module provides those measurements plus the detector view:

* `entropy_from_log_probs`: H(p) = -sum_l p_l log p_l (nats), per row
  (re-exported from fgjax.impostors).
* `ks_distance`: exact two-sample KS statistic sup_t |F_known(t) - F_unknown(t)|.
* `auroc`: area under the ROC curve of a score as an "unknown" detector
  (Mann-Whitney U, ties counted half).
* `threshold_at_tpr` / `reject_unknown`: an entropy threshold chosen on known-
  class validation data, and the rule that predicts -1 ("unknown") above it.
* `openset_report`: all of the above for two entropy samples.
* `save_entropy_histogram`: Fig. 4-style histograms (needs matplotlib, the
  optional 'plots' extra).

Example:
  h_val = entropy_from_log_probs(val_log_probs)
  thr = threshold_at_tpr(h_val, tpr=0.95)
  pred, is_unknown = reject_unknown(test_log_probs, thr)
  report = openset_report(entropy_from_log_probs(birds_lp),
                          entropy_from_log_probs(non_birds_lp))
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.impostors import entropy_from_log_probs  # re-exported
from fgjax.losses import _checks

UNKNOWN = -1  # label predicted for rejected (open-set) inputs


def _check_sample(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"`{name}` must be 1-D (num_samples,); got shape {x.shape}.")
  if x.size == 0:
    raise ValueError(f"`{name}` is empty; need at least one value.")
  if not (np.issubdtype(x.dtype, np.floating) or
          np.issubdtype(x.dtype, np.integer)):
    raise TypeError(f"`{name}` must be numeric; got {x.dtype}.")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(
        f"`{name}` contains NaN or inf at indices "
        f"{np.flatnonzero(~np.isfinite(x))[:5].tolist()}; drop or fix them.")
  return x


def ks_distance(a: Any, b: Any) -> float:
  """Exact two-sample Kolmogorov-Smirnov statistic (the number in Fig. 4).

  D = sup_t |F_a(t) - F_b(t)|, with F the empirical CDFs. The supremum is
  attained at a sample value, so evaluating both right-continuous ECDFs at all
  pooled values is exact.

  Args:
    a: (n,) finite values, e.g. entropies on known classes.
    b: (m,) finite values, e.g. entropies on unknown classes.

  Returns:
    D in [0, 1] (0 for identical samples, 1 for separated ones).
  """
  a = np.sort(_check_sample(a, "a"))
  b = np.sort(_check_sample(b, "b"))
  t = np.concatenate([a, b])
  fa = np.searchsorted(a, t, side="right") / a.size
  fb = np.searchsorted(b, t, side="right") / b.size
  return float(np.max(np.abs(fa - fb)))


def auroc(known_scores: Any, unknown_scores: Any) -> float:
  """AUROC of a score (higher = more likely unknown) as an unknown detector.

  AUROC = P(s_unknown > s_known) + 0.5 P(s_unknown = s_known), computed
  from average ranks of the pooled sample (Mann-Whitney U / (n m)).

  Args:
    known_scores: (n,) scores of known-class inputs (negatives).
    unknown_scores: (m,) scores of unknown-class inputs (positives).

  Returns:
    AUROC in [0, 1]; 0.5 for identical samples, 1 when every unknown scores
    above every known.
  """
  neg = _check_sample(known_scores, "known_scores")
  pos = _check_sample(unknown_scores, "unknown_scores")
  pooled = np.concatenate([neg, pos])
  order = np.argsort(pooled, kind="mergesort")
  sorted_vals = pooled[order]
  # Average 1-based ranks within runs of equal values (ties count half).
  starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
  ends = np.r_[starts[1:], sorted_vals.size]
  avg = (starts + ends + 1) / 2.0
  ranks = np.empty(pooled.size)
  ranks[order] = np.repeat(avg, ends - starts)
  u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
  return float(u / (pos.size * neg.size))


def threshold_at_tpr(known_entropy: Any, tpr: float = 0.95) -> float:
  """Entropy threshold that accepts a fraction `tpr` of known-class inputs.

  Returns the smallest t among the known values with
  mean(known_entropy <= t) >= tpr, so `reject_unknown(.., t)` keeps at least
  `tpr` of the known-class validation inputs.

  Args:
    known_entropy: (n,) entropies on known-class validation data.
    tpr: target true-positive (acceptance) rate of known inputs, in (0, 1].

  Returns:
    The threshold (float).
  """
  h = np.sort(_check_sample(known_entropy, "known_entropy"))
  if not 0.0 < float(tpr) <= 1.0:
    raise ValueError(f"`tpr` must be in (0, 1]; got {tpr}.")
  # Small slack so that e.g. tpr=0.95 of n=100 is 95, not 96 by rounding.
  k = max(1, math.ceil(float(tpr) * h.size - 1e-9))
  return float(h[k - 1])


def reject_unknown(log_probs: Any, threshold: float
                   ) -> tuple[jax.Array, jax.Array]:
  """Arg-max prediction with an "unknown" option (Sec. 4.2).

  Args:
    log_probs: (B, C) floating log-probabilities.
    threshold: entropy threshold (nats), e.g. from `threshold_at_tpr`.

  Returns:
    pred: (B,) int32 class index, or UNKNOWN (-1) where entropy > threshold.
    is_unknown: (B,) bool, entropy > threshold.
  """
  log_probs = _checks.float_array(log_probs, "log_probs", 2)
  threshold = float(threshold)
  if math.isnan(threshold):
    raise ValueError("`threshold` is NaN; pass a finite entropy value.")
  is_unknown = entropy_from_log_probs(log_probs) > threshold
  return _reject(log_probs, is_unknown)


@jax.jit
def _reject(log_probs: jax.Array, is_unknown: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  pred = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  return jnp.where(is_unknown, UNKNOWN, pred), is_unknown


def openset_report(known_entropy: Any, unknown_entropy: Any, *,
                   tpr: float = 0.95) -> dict[str, float]:
  """Summary of how well entropy separates known from unknown inputs.

  Args:
    known_entropy: (n,) entropies on known-class test data (Fig. 4 "birds").
    unknown_entropy: (m,) entropies on unseen-class data ("non-birds").
    tpr: known-class acceptance rate for the threshold metrics. The threshold
      is chosen on `known_entropy` itself; pass validation entropies to
      `threshold_at_tpr` for an unbiased operating point.

  Returns:
    dict with "ks" (KS distance), "auroc", "threshold" (at `tpr`),
    "fpr_at_tpr" (fraction of unknown inputs accepted as known at that
    threshold), "known_mean", "unknown_mean", "known_median",
    "unknown_median", "num_known", "num_unknown".
  """
  known = _check_sample(known_entropy, "known_entropy")
  unknown = _check_sample(unknown_entropy, "unknown_entropy")
  thr = threshold_at_tpr(known, tpr)
  return {
      "ks": ks_distance(known, unknown),
      "auroc": auroc(known, unknown),
      "threshold": thr,
      "fpr_at_tpr": float(np.mean(unknown <= thr)),
      "known_mean": float(np.mean(known)),
      "unknown_mean": float(np.mean(unknown)),
      "known_median": float(np.median(known)),
      "unknown_median": float(np.median(unknown)),
      "num_known": int(known.size),
      "num_unknown": int(unknown.size),
  }


def save_entropy_histogram(path_png: str | os.PathLike[str], known: Any,
                           unknown: Any, title: str = "", *, bins: int = 50,
                           labels: tuple[str, str] = ("known", "unknown")
                           ) -> str:
  """Writes Fig. 4-style overlaid entropy histograms with the KS distance.

  Uses matplotlib's Agg canvas directly (no pyplot, no global backend
  change). matplotlib is the optional 'plots' extra.

  Args:
    path_png: output file; its directory must exist.
    known: (n,) entropies of known-class inputs.
    unknown: (m,) entropies of unknown-class inputs.
    title: plot title.
    bins: number of histogram bins shared by both samples.
    labels: legend names of the two samples.

  Returns:
    The path written, as a string.
  """
  known = _check_sample(known, "known")
  unknown = _check_sample(unknown, "unknown")
  if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
    raise ValueError(f"`bins` must be a positive int; got {bins!r}.")
  path = os.fspath(path_png)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ValueError(
        f"`path_png` directory {directory!r} does not exist; create it first.")
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "save_entropy_histogram needs matplotlib, the optional 'plots' extra: "
        "pip install 'fgjax[plots]' (or pip install matplotlib).") from e
  lo = min(known.min(), unknown.min())
  hi = max(known.max(), unknown.max())
  edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
  fig = Figure(figsize=(5, 3.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.hist(known, bins=edges, density=True, alpha=0.6, label=labels[0])
  ax.hist(unknown, bins=edges, density=True, alpha=0.6, label=labels[1])
  ax.set_xlabel("entropy (nats)")
  ax.set_ylabel("density")
  ax.set_title(title)
  ax.text(0.98, 0.95, f"KS = {ks_distance(known, unknown):.3f}",
          transform=ax.transAxes, ha="right", va="top")
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)
  return path
