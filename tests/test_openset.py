"""Tests for fgjax.openset (entropy, KS distance, AUROC, rejection rule)."""

import math

import numpy as np
import pytest

from fgjax import openset


def _log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_entropy_known_values():
  ninf = -np.inf
  lp = np.array([
      [math.log(0.25)] * 4,                      # uniform over 4: log 4
      [0.0, ninf, ninf, ninf],                   # one-hot: 0
      [math.log(0.5), math.log(0.5), ninf, ninf],  # p = 0 terms count 0
  ], np.float32)
  h = np.asarray(openset.entropy_from_log_probs(lp))
  np.testing.assert_allclose(h, [math.log(4), 0.0, math.log(2)], atol=1e-6)


def test_entropy_matches_numpy_reference():
  rng = np.random.default_rng(0)
  lp = _log_softmax(rng.normal(size=(16, 7)) * 3)
  p = np.exp(lp)
  ref = -(p * np.log(p)).sum(axis=1)
  np.testing.assert_allclose(
      np.asarray(openset.entropy_from_log_probs(lp.astype(np.float32))), ref,
      rtol=1e-5)


@pytest.mark.parametrize("n,m,seed", [(50, 70, 0), (200, 13, 1), (31, 31, 2)])
def test_ks_matches_scipy(n, m, seed):
  stats = pytest.importorskip("scipy.stats", reason="scipy is the KS reference")
  rng = np.random.default_rng(seed)
  a = rng.normal(size=n)
  b = rng.normal(0.4, 1.3, size=m)
  # Rounded values create ties, which the ECDF evaluation must handle.
  a, b = np.round(a, 1), np.round(b, 1)
  assert openset.ks_distance(a, b) == pytest.approx(
      stats.ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn(seed):
  metrics = pytest.importorskip("sklearn.metrics", reason="AUROC reference")
  rng = np.random.default_rng(seed)
  known = np.round(rng.normal(size=60), 1)       # ties within and across
  unknown = np.round(rng.normal(0.7, 1.0, size=45), 1)
  y = np.r_[np.zeros(known.size), np.ones(unknown.size)]
  ref = metrics.roc_auc_score(y, np.r_[known, unknown])
  assert openset.auroc(known, unknown) == pytest.approx(ref, abs=1e-12)


def test_known_answers_identical_and_disjoint():
  x = np.array([0.3, 1.0, 2.0, 2.0, 5.0])
  assert openset.ks_distance(x, x) == 0.0
  assert openset.auroc(x, x) == 0.5
  assert openset.ks_distance([0.0, 0.1], [1.0, 2.0, 3.0]) == 1.0
  assert openset.auroc([0.0, 0.1], [1.0, 2.0, 3.0]) == 1.0
  assert openset.auroc([1.0, 2.0, 3.0], [0.0, 0.1]) == 0.0
  # Hand-computed: pairs (u > k) = 3, ties = 1, total 4 -> (3 + 0.5) / 4.
  assert openset.auroc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.875)
  # ECDF gap: at t=1, F_a = 1/2 and F_b = 0.
  assert openset.ks_distance([1.0, 2.0], [2.0, 3.0]) == 0.5


def test_threshold_at_tpr():
  h = np.arange(100, dtype=np.float64)[::-1]  # 0..99, shuffled order
  assert openset.threshold_at_tpr(h, 0.95) == 94.0
  assert np.mean(h <= 94.0) == 0.95
  assert openset.threshold_at_tpr(h, 1.0) == 99.0
  assert openset.threshold_at_tpr(h, 0.001) == 0.0
  rng = np.random.default_rng(3)
  for tpr in (0.5, 0.8, 0.9, 0.95, 0.99):
    v = rng.exponential(size=37)
    t = openset.threshold_at_tpr(v, tpr)
    assert np.mean(v <= t) >= tpr
    assert np.mean(v < t) < tpr  # smallest such threshold


def test_reject_unknown():
  lp = np.log(np.array([
      [0.9, 0.05, 0.05],      # confident -> class 0
      [1 / 3, 1 / 3, 1 / 3],  # uniform -> unknown
      [0.1, 0.1, 0.8],        # confident -> class 2
  ], np.float32))
  h = -(np.exp(lp) * lp).sum(1)
  thr = float((h[0] + h[1]) / 2)
  assert h[2] < thr  # sanity of the fixture
  pred, unk = openset.reject_unknown(lp, thr)
  np.testing.assert_array_equal(np.asarray(pred), [0, openset.UNKNOWN, 2])
  np.testing.assert_array_equal(np.asarray(unk), [False, True, False])
  pred, unk = openset.reject_unknown(lp, 10.0)
  # Ties in the uniform row resolve to the first class, like np.argmax.
  np.testing.assert_array_equal(np.asarray(pred), [0, 0, 2])
  assert not np.asarray(unk).any()


def test_openset_report_values():
  known = np.array([0.1, 0.2, 0.3, 0.4])
  unknown = np.array([0.35, 0.9, 1.0])
  r = openset.openset_report(known, unknown, tpr=0.75)
  assert r["threshold"] == 0.3
  assert r["fpr_at_tpr"] == 0.0
  assert r["ks"] == 0.75     # at t=0.3: F_known = 3/4, F_unknown = 0
  assert r["auroc"] == pytest.approx(11 / 12)  # only (0.4 > 0.35) is wrong
  assert r["known_mean"] == pytest.approx(0.25)
  assert r["unknown_median"] == 0.9
  assert (r["num_known"], r["num_unknown"]) == (4, 3)


def test_errors():
  with pytest.raises(ValueError, match="known_scores"):
    openset.auroc(np.zeros((2, 2)), [1.0])
  with pytest.raises(ValueError, match="empty"):
    openset.ks_distance([], [1.0])
  with pytest.raises(ValueError, match="NaN"):
    openset.ks_distance([np.nan], [1.0])
  with pytest.raises(ValueError, match="tpr"):
    openset.threshold_at_tpr([1.0], 0.0)
  with pytest.raises(TypeError, match="log_probs"):
    openset.reject_unknown(np.zeros((2, 3), np.int32), 0.5)
  with pytest.raises(ValueError, match="threshold"):
    openset.reject_unknown(np.zeros((2, 3), np.float32), float("nan"))


def test_save_entropy_histogram(tmp_path):
  pytest.importorskip("matplotlib", reason="optional 'plots' extra")
  rng = np.random.default_rng(0)
  path = openset.save_entropy_histogram(
      tmp_path / "h.png", rng.exponential(0.5, 200), rng.normal(3, 0.5, 100),
      "ImpostorNet-fixed")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="directory"):
    openset.save_entropy_histogram(tmp_path / "no" / "h.png", [1.0], [2.0])
