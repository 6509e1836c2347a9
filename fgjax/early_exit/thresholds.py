"""Per-exit thresholds of sequential early-exit inference (pure NumPy).

Savchenko, "Sequential analysis in image recognition" (OpenTalks.AI 2021;
IJCNN 2020; Information Sciences 2021). With M exits, the m-th classifier's
confidence scores s_m^(c)(x_m) decide at exit m when (eq. 3)

    max_c s_m^(c)(x_m) > s_m,

and the last exit always answers. The thresholds come from a stratified split of
the N training images: classifier m is fitted on K of them, and on the N - K
held-out images the wrong-class maxima max_{c != c(n)} s_m^(c)(x_{n;m}) are the
scores a false acceptance would have. s_m is set so that exactly
floor(alpha_m (N - K)) of them exceed it (eq. 4), with the Benjamini-Hochberg
correction alpha_m = alpha * m / M ('adaptive') or alpha_m = alpha for every
exit ('fixed', the paper's baseline).
"""

import math
from typing import Any, Sequence

import numpy as np

RULES = ("adaptive", "fixed")

# floor/ceil of a product that is an integer in exact arithmetic (0.29 * 100 =
# 28.999999999999996 in floats) must not lose one; the slack is relative so it
# stays far below 1 for any realistic size.
_REL_TOL = 1e-9


def _int_arg(x: Any, name: str, low: int) -> int:
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
    raise TypeError(f"`{name}` must be an int; got {x!r}.")
  if x < low:
    raise ValueError(f"`{name}` must be >= {low}; got {x}.")
  return int(x)


def _int_labels(labels: Any, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"`{name}` must be 1-D (N,); got shape {labels.shape}.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"`{name}` must be integer class ids; got dtype {labels.dtype}.")
  return labels.astype(np.int64)


def holdout_split(labels: np.ndarray, delta: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified fit / held-out split of the training set (algorithm step 6).

  Class c with n_c images puts k_c = ceil(n_c * delta) of them in the fit part,
  clipped to at least 1 and, when n_c >= 2, at most n_c - 1: every class is
  fitted and every class with 2+ images has a held-out image. The paper's
  K = ceil(N * delta) is then approximately sum_c k_c (per-class ceilings and the
  clipping move it by at most the number of classes). ceil ignores float error
  (10 * 0.7 = 7.000000000000001 gives k_c = 7, not 8).

  Args:
    labels: (N,) int class ids >= 0.
    delta: fit fraction in (0, 1).
    seed: seeds one np.random.default_rng, which permutes each class in turn
      (classes in increasing id order), so a seed fixes the split.

  Returns:
    (fit_idx, held_idx): sorted int64 index arrays into `labels`, disjoint,
    together 0..N-1.

  Raises:
    ValueError: delta outside (0, 1), empty or negative labels.
  """
  labels = _int_labels(labels, "labels")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"`delta` is the fit fraction and must lie in (0, 1); "
                     f"got {delta}.")
  if labels.size == 0:
    raise ValueError("`labels` is empty; need at least one training image to split.")
  if labels.min() < 0:
    raise ValueError(f"`labels` must be >= 0 class ids; got min {labels.min()}.")
  rng = np.random.default_rng(seed)
  fit, held = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n = len(idx)
    k = math.ceil(n * delta * (1.0 - _REL_TOL))
    k = 1 if n < 2 else min(max(k, 1), n - 1)
    fit.append(idx[:k])
    held.append(idx[k:])
  return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def wrong_class_max(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Maximal wrong-class score of each held-out image (algorithm step 10).

  S_n = max_{c != labels[n]} scores[n, c], the score that would make exit m
  accept a wrong class by eq. (3).

  Args:
    scores: (N, C) confidence scores s_m^(c) of one exit.
    labels: (N,) int true classes in [0, C).

  Returns:
    (N,) float64; -inf everywhere when C == 1 (no wrong class exists).

  Raises:
    ValueError: shapes disagree or a label lies outside [0, C).
  """
  scores = np.asarray(scores)
  labels = _int_labels(labels, "labels")
  if scores.ndim != 2:
    raise ValueError(f"`scores` must be 2-D (N, C); got shape {scores.shape}.")
  if scores.shape[0] != labels.shape[0]:
    raise ValueError(f"`scores` has {scores.shape[0]} rows but `labels` has "
                     f"{labels.shape[0]} entries; pass one label per row.")
  c = scores.shape[1]
  if labels.size and (labels.min() < 0 or labels.max() >= c):
    raise ValueError(f"`labels` must lie in [0, {c}) (the columns of `scores`); "
                     f"got min {labels.min()}, max {labels.max()}.")
  wrong = scores.astype(np.float64)
  wrong[np.arange(len(labels)), labels] = -np.inf
  if c == 1:
    return wrong[:, 0]
  return wrong.max(axis=1)


def threshold_index(alpha: float, m: int, num_exits: int, num_held: int,
                    rule: str) -> int:
  """Number of held-out wrong-class scores allowed above s_m, the RHS of eq. (4).

  'adaptive': floor(alpha_m * num_held) with the Benjamini-Hochberg
  alpha_m = alpha * m / M; 'fixed': floor(alpha * num_held) at every exit. The
  floor tolerates float error (alpha = 0.1, m = M = 3, num_held = 10 gives 1).

  Args:
    alpha: overall false acceptance rate in [0, 1].
    m: 1-based exit number, 1..num_exits.
    num_exits: M >= 1.
    num_held: N - K >= 0, held-out images scored at exit m.
    rule: one of RULES.

  Returns:
    An int in [0, num_held].
  """
  if rule not in RULES:
    raise ValueError(f"`rule` must be one of {RULES}; got {rule!r}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"`alpha` is a false acceptance rate and must lie in [0, 1]; "
                     f"got {alpha}.")
  num_exits = _int_arg(num_exits, "num_exits", 1)
  m = _int_arg(m, "m", 1)
  if m > num_exits:
    raise ValueError(f"`m` is the 1-based exit number and must be in "
                     f"1..{num_exits} (num_exits); got {m}.")
  num_held = _int_arg(num_held, "num_held", 0)
  x = alpha * num_held * (m / num_exits if rule == "adaptive" else 1.0)
  return math.floor(x + _REL_TOL * max(1.0, x))


def threshold(wrong_scores: np.ndarray, index: int) -> float:
  """s_m with exactly `index` held-out wrong-class scores strictly above it, eq. (4).

  With S sorted in descending order, s_m = S[index] (0-based), so S[0..index-1]
  pass the strict test max_c s_m^(c) > s_m of eq. (3) and no other score does.
  The paper's algorithm line ("the floor(...)-th largest element", 1-based)
  would let only index - 1 scores through and is undefined for index 0; we follow
  eq. (4), which counts exactly floor(...) exceedances: index 0 gives max(S), so
  no held-out wrong-class score passes. index >= len(S) gives -inf (every image
  exits). Ties (S[index - 1] == S[index]) leave fewer than `index` scores
  strictly above: the rule is then conservative (fewer false accepts).

  Args:
    wrong_scores: (N_held,) wrong-class maxima of one exit (`wrong_class_max`);
      -inf entries are allowed, NaN is not.
    index: int >= 0, usually `threshold_index(...)`.

  Returns:
    The threshold as a Python float.
  """
  s = np.asarray(wrong_scores, np.float64)
  if s.ndim != 1:
    raise ValueError(f"`wrong_scores` must be 1-D (N_held,); got shape {s.shape}.")
  if np.isnan(s).any():
    raise ValueError(f"`wrong_scores` contains NaN at indices "
                     f"{np.flatnonzero(np.isnan(s))[:5].tolist()}; fix the scores.")
  index = _int_arg(index, "index", 0)
  if index >= len(s):
    return -math.inf
  return float(np.sort(s)[::-1][index])


def exit_thresholds(wrong_scores: Sequence[np.ndarray], alpha: float,
                    rule: str) -> np.ndarray:
  """Thresholds s_1..s_M of all exits (algorithm step 12 for m = 1..M).

  s_m = threshold(S_m, threshold_index(alpha, m, M, len(S_m), rule)): eq. (4)
  with alpha_m = alpha * m / M ('adaptive') or alpha ('fixed'). The last exit's
  threshold is computed like the others although the runtime ignores it (the
  last exit always answers); it shows how confident that exit is.

  Args:
    wrong_scores: M >= 1 arrays; wrong_scores[m - 1] is (N_held_m,), the
      `wrong_class_max` of exit m on its held-out images.
    alpha: overall false acceptance rate in [0, 1].
    rule: one of RULES.

  Returns:
    (M,) float64 thresholds.
  """
  wrong_scores = list(wrong_scores)
  if not wrong_scores:
    raise ValueError("`wrong_scores` is empty; pass one array per exit (M >= 1).")
  num_exits = len(wrong_scores)
  out = np.empty(num_exits, np.float64)
  for m, s in enumerate(wrong_scores, start=1):
    s = np.asarray(s)
    if s.ndim != 1:
      raise ValueError(f"`wrong_scores[{m - 1}]` must be 1-D (N_held,); got shape "
                       f"{s.shape}.")
    out[m - 1] = threshold(s, threshold_index(alpha, m, num_exits, len(s), rule))
  return out


__all__ = ["RULES", "holdout_split", "wrong_class_max", "threshold_index",
           "threshold", "exit_thresholds"]
