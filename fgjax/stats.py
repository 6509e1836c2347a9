"""Uncertainty of an accuracy and the paired test of two classifiers on one test set.

Results tables quote a top-1 with its binomial standard error, and compare two runs
on the same images with McNemar's exact test (McNemar 1947): only the images on which
exactly one of the two is right carry information about which is better, and under
the null hypothesis of equal accuracy each such image is a fair coin.
"""

import math

import numpy as np


def binomial_se(accuracy: float, n: int) -> float:
  """Standard error sqrt(p (1 - p) / n) of an accuracy p measured on n images."""
  if n < 1:
    raise ValueError(f"binomial_se needs at least one image, got n={n}")
  if not 0.0 <= accuracy <= 1.0:
    raise ValueError(f"an accuracy lies in [0, 1], got {accuracy}")
  return math.sqrt(accuracy * (1.0 - accuracy) / n)


def mcnemar(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> dict:
  """Exact two-sided McNemar test of classifiers a and b on the same images.

  Args:
    pred_a, pred_b: (N,) predicted classes of the two classifiers.
    labels: (N,) true classes.

  Returns:
    {'only_a_right': b01, 'only_b_right': b10, 'p_value'}: p is twice the smaller
    binomial(b01 + b10, 1/2) tail, capped at 1 (1.0 when no image is discordant).
  """
  pred_a, pred_b, labels = (np.asarray(x) for x in (pred_a, pred_b, labels))
  if not pred_a.shape == pred_b.shape == labels.shape or pred_a.ndim != 1:
    raise ValueError("mcnemar needs three (N,) arrays of one length, got shapes "
                     f"{pred_a.shape}, {pred_b.shape}, {labels.shape}: were both runs "
                     "evaluated on the same split?")
  right_a, right_b = pred_a == labels, pred_b == labels
  only_a = int(np.sum(right_a & ~right_b))
  only_b = int(np.sum(right_b & ~right_a))
  n = only_a + only_b
  if n == 0:
    p = 1.0
  else:
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2.0**n
    p = min(1.0, 2.0 * tail)
  return {"only_a_right": only_a, "only_b_right": only_b, "p_value": p}
