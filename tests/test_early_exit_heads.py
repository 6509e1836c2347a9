"""Tests for fgjax.early_exit.thresholds and fgjax.early_exit.heads.

Thresholds against hand-computed values of eq. (4); heads against sklearn and a
float64 NumPy RBF reference, on tiny l2-normalised Gaussian blobs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import linear_model
from sklearn import svm

from fgjax.early_exit import heads
from fgjax.early_exit import thresholds as thr


def _blobs(classes=(0, 1, 2, 4), per_class=8, dim=12, seed=0, spread=0.4):
  """l2-normalised Gaussian blobs, one per class id in `classes`."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(max(classes) + 1, dim))
  y = np.repeat(np.asarray(classes), per_class)
  x = means[y] + spread * rng.normal(size=(len(y), dim))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), y.astype(np.int32)


def _rbf_probs_ref(q, centers, labels, sigma, num_classes):
  q, centers = np.asarray(q, np.float64), np.asarray(centers, np.float64)
  d2 = ((q[:, None] - centers[None]) ** 2).sum(-1)
  w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * sigma**2))
  out = np.zeros((len(q), num_classes))
  for j, l in enumerate(labels):
    out[:, l] += w[:, j]
  return out / out.sum(1, keepdims=True)


# ---------------------------------------------------------------- thresholds


def test_threshold_known_list():
  s = np.array([0.3, 0.9, -0.2, 0.5, 0.1])
  assert thr.threshold(s, 0) == 0.9          # nothing passes the strict test
  assert thr.threshold(s, 2) == 0.3
  for index in range(len(s)):
    assert (s > thr.threshold(s, index)).sum() == index   # eq. (4), exactly
  assert thr.threshold(s, 5) == -np.inf      # index == len: everything exits
  assert thr.threshold(s, 9) == -np.inf
  assert thr.threshold(np.zeros(0), 0) == -np.inf


def test_threshold_ties_are_conservative():
  s = np.array([1.0, 3.0, 5.0, 3.0])
  assert thr.threshold(s, 1) == 3.0 and (s > 3.0).sum() == 1
  # Sorted [5, 3, 3, 1]: index 2 lands on the tie, only 1 score lies above.
  assert thr.threshold(s, 2) == 3.0
  assert thr.threshold(s, 3) == 1.0 and (s > 1.0).sum() == 3


def test_threshold_errors():
  with pytest.raises(ValueError, match="NaN"):
    thr.threshold(np.array([1.0, np.nan]), 0)
  with pytest.raises(ValueError, match="index"):
    thr.threshold(np.array([1.0]), -1)
  with pytest.raises(ValueError, match="1-D"):
    thr.threshold(np.ones((2, 2)), 0)


def test_threshold_index_rules():
  assert thr.threshold_index(0.1, 3, 3, 10, "adaptive") == 1   # float-floor case
  assert thr.threshold_index(0.1, 1, 3, 10, "adaptive") == 0   # 0.33
  assert thr.threshold_index(0.1, 2, 3, 30, "adaptive") == 2
  assert thr.threshold_index(0.29, 1, 1, 100, "adaptive") == 29  # 28.999999999999996
  assert thr.threshold_index(0.29, 2, 3, 100, "fixed") == 29
  assert thr.threshold_index(0.25, 1, 4, 10, "fixed") == 2
  for rule in thr.RULES:
    assert thr.threshold_index(0.0, 2, 3, 50, rule) == 0
    assert thr.threshold_index(1.0, 3, 3, 50, rule) == 50
  assert thr.threshold_index(1.0, 1, 3, 50, "adaptive") == 16
  assert thr.threshold_index(1.0, 1, 3, 50, "fixed") == 50
  assert thr.threshold_index(0.5, 1, 2, 0, "adaptive") == 0


def test_threshold_index_errors():
  with pytest.raises(ValueError, match="alpha"):
    thr.threshold_index(1.5, 1, 3, 10, "adaptive")
  with pytest.raises(ValueError, match="alpha"):
    thr.threshold_index(-0.1, 1, 3, 10, "fixed")
  with pytest.raises(ValueError, match="`m`"):
    thr.threshold_index(0.1, 4, 3, 10, "adaptive")
  with pytest.raises(ValueError, match="`m`"):
    thr.threshold_index(0.1, 0, 3, 10, "adaptive")
  with pytest.raises(ValueError, match="adaptive"):
    thr.threshold_index(0.1, 1, 3, 10, "bonferroni")


def test_exit_thresholds_by_hand():
  s1 = np.array([0.6, 0.1, 0.9, 0.4, 0.2, 0.8])   # desc 0.9 0.8 0.6 0.4 0.2 0.1
  s2 = np.array([2.0, -1.0, 3.0, 1.0])            # desc 3 2 1 -1
  s3 = np.arange(10.0)                            # desc 9 8 ... 0
  # adaptive, alpha = 0.5: floor(0.5*1*6/3) = 1, floor(0.5*2*4/3) = 1,
  # floor(0.5*3*10/3) = 5.
  np.testing.assert_array_equal(thr.exit_thresholds([s1, s2, s3], 0.5, "adaptive"),
                                [0.8, 2.0, 4.0])
  # fixed: floor(0.5*6) = 3, floor(0.5*4) = 2, floor(0.5*10) = 5.
  out = thr.exit_thresholds([s1, s2, s3], 0.5, "fixed")
  assert out.dtype == np.float64
  np.testing.assert_array_equal(out, [0.4, 1.0, 4.0])
  with pytest.raises(ValueError, match="empty"):
    thr.exit_thresholds([], 0.5, "fixed")


def test_wrong_class_max_matches_loop():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(9, 4)).astype(np.float32)
  y = rng.integers(0, 4, 9)
  ref = [max(s[n, c] for c in range(4) if c != y[n]) for n in range(9)]
  np.testing.assert_array_equal(thr.wrong_class_max(s, y), ref)
  np.testing.assert_array_equal(thr.wrong_class_max(np.ones((3, 1)), [0, 0, 0]),
                                [-np.inf] * 3)
  with pytest.raises(ValueError, match="rows"):
    thr.wrong_class_max(s, y[:5])
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    thr.wrong_class_max(s, np.full(9, 4))


def test_holdout_split_invariants():
  counts = {0: 1, 1: 2, 2: 3, 3: 7, 5: 10}
  labels = np.repeat(list(counts), list(counts.values()))
  np.random.default_rng(0).shuffle(labels)
  fit, held = thr.holdout_split(labels, 0.3, seed=4)
  assert fit.dtype == held.dtype == np.int64
  assert np.all(np.diff(fit) > 0) and np.all(np.diff(held) > 0)
  assert np.intersect1d(fit, held).size == 0
  np.testing.assert_array_equal(np.union1d(fit, held), np.arange(len(labels)))
  # k_c = ceil(0.3 n_c) clipped to [1, n_c - 1].
  want = {0: 1, 1: 1, 2: 1, 3: 3, 5: 3}
  assert {c: int((labels[fit] == c).sum()) for c in counts} == want
  # 10 * 0.7 is 7.000000000000001 in floats; k_c is still 7, not 8.
  fit7, _ = thr.holdout_split(labels, 0.7, seed=4)
  assert {c: int((labels[fit7] == c).sum()) for c in counts} == {
      0: 1, 1: 1, 2: 2, 3: 5, 5: 7}
  assert set(labels[held]) == {1, 2, 3, 5}
  again = thr.holdout_split(labels, 0.3, seed=4)
  np.testing.assert_array_equal(again[0], fit)
  other = thr.holdout_split(labels, 0.3, seed=5)
  assert not np.array_equal(other[0], fit)


def test_holdout_split_errors():
  for delta in (0.0, 1.0, -0.2):
    with pytest.raises(ValueError, match="delta"):
      thr.holdout_split(np.array([0, 1]), delta, 0)
  with pytest.raises(ValueError, match="empty"):
    thr.holdout_split(np.zeros(0, np.int64), 0.5, 0)
  with pytest.raises(ValueError, match=">= 0"):
    thr.holdout_split(np.array([0, -1]), 0.5, 0)


# --------------------------------------------------------------------- heads


def test_svm_scores_match_decision_function():
  x, y = _blobs()
  head = heads.fit("svm", x, y, 5, seed=3)
  ref = svm.LinearSVC(loss="squared_hinge", C=1.0, random_state=3).fit(x, y)
  s = np.asarray(heads.scores(head, x))
  assert s.shape == (len(x), 5) and head.num_classes == 5 and head.dim == 12
  np.testing.assert_allclose(s[:, ref.classes_], ref.decision_function(x),
                             rtol=1e-5, atol=1e-5)
  q, _ = _blobs(seed=9)   # fresh points: the absent class 3 still never wins
  assert not np.any(np.argmax(np.asarray(heads.scores(head, q)), 1) == 3)
  np.testing.assert_array_equal(np.argmax(s, 1), ref.predict(x))


def test_logreg_scores_match_predict_proba():
  x, y = _blobs(seed=2)
  head = heads.fit("logreg", x, y, 5)
  ref = linear_model.LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
  p = np.asarray(heads.scores(head, x))
  np.testing.assert_allclose(p[:, ref.classes_], ref.predict_proba(x),
                             rtol=1e-5, atol=1e-6)
  assert np.all(p[:, 3] < 1e-30)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_binary_heads():
  x, y = _blobs(classes=(1, 3), seed=5)
  s = np.asarray(heads.scores(heads.fit("svm", x, y, 4), x))
  df = svm.LinearSVC(random_state=0).fit(x, y).decision_function(x)
  np.testing.assert_allclose(s[:, 3], df, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s[:, 1], -df, rtol=1e-5, atol=1e-5)
  assert set(np.argmax(s, 1)) <= {1, 3}
  p = np.asarray(heads.scores(heads.fit("logreg", x, y, 4), x))
  ref = linear_model.LogisticRegression(max_iter=1000).fit(x, y)
  np.testing.assert_allclose(p[:, [1, 3]], ref.predict_proba(x), rtol=1e-5, atol=1e-6)


def test_rbf_scores_match_numpy():
  x, y = _blobs(seed=3)
  head = heads.fit("rbf", x, y, 5, sigma=0.3)
  q, _ = _blobs(seed=7)
  p = np.asarray(heads.scores(head, q))
  np.testing.assert_allclose(p, _rbf_probs_ref(q, x, y, 0.3, 5), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
  assert np.all(p[:, 3] == 0.0) and head.num_classes == 5


def test_rbf_sigma_is_leave_one_out_best():
  x, y = _blobs(classes=(0, 1, 2), per_class=6, dim=8, seed=4, spread=1.0)
  d2 = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d2, np.inf)            # each point is classified by the others
  top1 = {}
  for sigma in heads.SIGMA_GRID:
    w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * sigma**2))
    per_class = np.stack([w[:, y == c].sum(1) for c in range(3)], 1)
    top1[sigma] = np.mean(np.argmax(per_class, 1) == y)
  want = max(heads.SIGMA_GRID, key=lambda s: (top1[s], -s))
  head = heads.fit("rbf", x, y, 3)
  assert float(head.arrays["sigma"]) == pytest.approx(want)


@pytest.mark.parametrize("kind", heads.HEADS)
def test_scores_under_jit_equal_eager(kind):
  x, y = _blobs(seed=6)
  head = heads.fit(kind, x, y, 5, sigma=0.2 if kind == "rbf" else None)
  q = jnp.asarray(_blobs(seed=8)[0])
  eager = heads.scores(head, q)
  jitted = jax.jit(lambda f: heads.scores(head, f))(q)
  # XLA fuses the jitted exp/log-sum-exp differently: float32 rounding only.
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager),
                             rtol=1e-5, atol=1e-6)


def test_to_from_arrays_round_trip(tmp_path):
  x, y = _blobs()
  linear, rbf = heads.fit("svm", x, y, 5), heads.fit("rbf", x, y, 5, sigma=0.1)
  path = tmp_path / "heads.npz"
  np.savez(path, **heads.to_arrays(linear, "exit0"), **heads.to_arrays(rbf, "exit1"))
  with np.load(path) as npz:
    back = [heads.from_arrays("svm", npz, "exit0"),
            heads.from_arrays("rbf", npz, "exit1")]
  for head, loaded in zip((linear, rbf), back):
    assert loaded.kind == head.kind and loaded.arrays.keys() == head.arrays.keys()
    for name, a in head.arrays.items():
      assert loaded.arrays[name].dtype == a.dtype
      np.testing.assert_array_equal(loaded.arrays[name], a)
    np.testing.assert_array_equal(np.asarray(heads.scores(loaded, x)),
                                  np.asarray(heads.scores(head, x)))
  stored = heads.to_arrays(linear, "exit0")
  del stored["exit0/bias"]
  with pytest.raises(ValueError, match="exit0/bias"):
    heads.from_arrays("svm", stored, "exit0")
  stored = heads.to_arrays(linear, "exit0")
  stored["exit0/bias"] = stored["exit0/bias"][:2]
  with pytest.raises(ValueError, match="exit0/bias"):
    heads.from_arrays("logreg", stored, "exit0")
  with pytest.raises(ValueError, match="exit0/centers"):
    heads.from_arrays("rbf", heads.to_arrays(linear, "exit0"), "exit0")


def test_fit_errors():
  x, y = _blobs()
  with pytest.raises(ValueError, match="svm"):
    heads.fit("knn", x, y, 5)
  with pytest.raises(ValueError, match="labels"):
    heads.fit("svm", x, y, 4)             # label 4 outside [0, 4)
  with pytest.raises(ValueError, match="labels"):
    heads.fit("svm", x, y[:-1], 5)
  bad = x.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    heads.fit("logreg", bad, y, 5)
  with pytest.raises(ValueError, match="2-D"):
    heads.fit("rbf", x[0], y[:1], 5)
  with pytest.raises(ValueError, match=">= 2 classes"):
    heads.fit("svm", x[:8], y[:8], 5)
  with pytest.raises(ValueError, match="features"):
    heads.scores(heads.fit("svm", x, y, 5), x[:, :5])
