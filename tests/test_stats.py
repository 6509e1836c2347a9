"""fgjax.stats: binomial standard error and McNemar's exact paired test."""

import math

import numpy as np
import pytest

from fgjax import stats


def test_binomial_se_known_values():
  assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)
  assert stats.binomial_se(0.75, 2452) == pytest.approx(math.sqrt(0.1875 / 2452))
  assert stats.binomial_se(1.0, 10) == 0.0


@pytest.mark.parametrize("p,n", [(1.2, 10), (-0.1, 10), (0.5, 0)])
def test_binomial_se_refuses_bad_input(p, n):
  with pytest.raises(ValueError):
    stats.binomial_se(p, n)


def test_mcnemar_counts_and_exact_p():
  labels = np.zeros(20, np.int32)
  a = np.zeros(20, np.int32)   # right on all 20
  b = np.zeros(20, np.int32)
  b[:7] = 1                    # b wrong on 7 of them
  a[19] = 2                    # a wrong on one b gets right
  out = stats.mcnemar(a, b, labels)
  assert (out["only_a_right"], out["only_b_right"]) == (7, 1)
  # Two-sided exact: 2 * P(X <= 1), X ~ Binomial(8, 1/2) = 2 * 9 / 256.
  assert out["p_value"] == pytest.approx(18 / 256)
  # Symmetric in the order of the two classifiers.
  assert stats.mcnemar(b, a, labels)["p_value"] == pytest.approx(18 / 256)


def test_mcnemar_without_discordant_images_is_one():
  y = np.arange(5)
  assert stats.mcnemar(y, y, y)["p_value"] == 1.0
  balanced = stats.mcnemar(np.array([0, 9]), np.array([9, 1]), np.array([0, 1]))
  assert balanced["p_value"] == 1.0


def test_mcnemar_refuses_different_lengths():
  with pytest.raises(ValueError, match="same split"):
    stats.mcnemar(np.zeros(3), np.zeros(4), np.zeros(3))
