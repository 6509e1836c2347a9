"""Impostor selection: leave-one-out posteriors against float64 NumPy, the drop / keep /
add rules on hand-made cases, and eq. (13) of the NNGK review by hand and as an
invariant (labels stay distributions)."""
import numpy as np
import pytest

from fgjax import impostor_selection as sel
from fgjax import impostors


def _loo_reference(centers, labels, sigma):
  c = np.asarray(centers, np.float64)
  d = ((c[:, None] - c[None]) ** 2).sum(-1)
  w = np.exp(-d / (2 * sigma**2))
  np.fill_diagonal(w, 0.0)
  same = labels[:, None] == labels[None, :]
  return (w * same).sum(1) / w.sum(1)


@pytest.mark.parametrize("query_chunk,chunk_size", [(7, 5), (1024, 8192)])
def test_leave_one_out_posterior_matches_float64(query_chunk, chunk_size):
  rng = np.random.default_rng(0)
  c = rng.normal(size=(23, 3)).astype(np.float32)
  labels = rng.integers(0, 4, 23).astype(np.int32)
  labels[0] = 4                                        # alone in its class: 0
  got = sel.leave_one_out_posterior(impostors.ImpostorSet(c, labels), 0.8, 5,
                                    query_chunk=query_chunk, chunk_size=chunk_size)
  want = _loo_reference(c, labels, 0.8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[0] == 0.0


def test_soft_posterior_equals_hard_one_for_one_hot_labels():
  rng = np.random.default_rng(1)
  c = rng.normal(size=(19, 4)).astype(np.float32)
  labels = rng.integers(0, 3, 19).astype(np.int32)
  hard = sel.leave_one_out_posterior(impostors.ImpostorSet(c, labels), 1.1, 3)
  soft = sel.soft_leave_one_out_posterior(c, np.eye(3)[labels], 1.1, query_chunk=6)
  np.testing.assert_allclose(soft, hard, rtol=1e-5, atol=1e-7)


def test_keep_random():
  kept = sel.keep_random(100, 0.25, seed=3)
  assert len(kept) == 25 and np.all(np.diff(kept) > 0) and kept.max() < 100
  np.testing.assert_array_equal(kept, sel.keep_random(100, 0.25, seed=3))
  assert not np.array_equal(kept, sel.keep_random(100, 0.25, seed=4))
  np.testing.assert_array_equal(sel.keep_random(8, 1.0, 0), np.arange(8))
  assert len(sel.keep_random(3, 0.01, 0)) == 1
  with pytest.raises(ValueError, match="fraction"):
    sel.keep_random(10, 0.0, 0)


def test_keep_random_per_class():
  labels = np.array([0] * 8 + [1] * 3 + [2])
  kept = sel.keep_random_per_class(labels, 0.25, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[kept]), [2, 1, 1])  # floor of 1
  assert np.all(np.diff(kept) > 0)
  np.testing.assert_array_equal(kept, sel.keep_random_per_class(labels, 0.25, seed=0))
  np.testing.assert_array_equal(sel.keep_random_per_class(labels, 1.0, 1),
                                np.arange(12))


def test_drop_best_predicted_by_hand():
  posterior = np.array([0.9, 0.9, 0.1, 0.5, 0.8])
  labels = np.array([0, 0, 0, 1, 1])
  # Drop order (ties: lower index first): 0, 1, 4, 3, 2; protected: 2 (class 0's
  # last), 3 (class 1's last).
  np.testing.assert_array_equal(sel.drop_best_predicted(posterior, labels, 2), [2, 3, 4])
  np.testing.assert_array_equal(sel.drop_best_predicted(posterior, labels, 3), [2, 3])
  np.testing.assert_array_equal(sel.drop_best_predicted(posterior, labels, 5), [2, 3])
  np.testing.assert_array_equal(sel.drop_best_predicted(posterior, labels, 0),
                                np.arange(5))


def _greedy_reference(posterior, labels, num_drop):
  order = sorted(range(len(posterior)), key=lambda i: (-posterior[i], i))
  left = {c: int(np.sum(labels == c)) for c in np.unique(labels)}
  dropped = set()
  for i in order:
    if len(dropped) == num_drop:
      break
    if left[labels[i]] > 1:
      left[labels[i]] -= 1
      dropped.add(i)
  return np.array([i for i in range(len(posterior)) if i not in dropped])


@pytest.mark.parametrize("seed", range(5))
def test_drop_best_predicted_is_the_sequential_rule(seed):
  rng = np.random.default_rng(seed)
  m = 40
  posterior = np.round(rng.random(m), 1)              # many ties
  labels = rng.integers(0, 7, m)
  for num_drop in (0, 10, 30, 40):
    kept = sel.drop_best_predicted(posterior, labels, num_drop)
    np.testing.assert_array_equal(kept, _greedy_reference(posterior, labels, num_drop))
    assert set(labels[kept]) == set(labels)           # no class lost
    assert len(kept) == max(m - num_drop, len(set(labels)))


def test_add_worst_predicted():
  np.testing.assert_array_equal(sel.add_worst_predicted([0.5, 0.1, 0.1, 0.9], 3),
                                [1, 2, 0])
  assert len(sel.add_worst_predicted([0.2, 0.3], 0)) == 0
  with pytest.raises(ValueError, match="num_add"):
    sel.add_worst_predicted([0.2, 0.3], 3)


def test_redistribution_by_hand():
  # 1-D centers 0, 1, 3; sigma^2 = 1/2 so k(a, b) = exp(-(a - b)^2). Center 0 is class
  # A, centers 1 and 2 class B. Around z_0 = center 0:
  #   k = 1: N_1(z_1) = {z_0}, so w_1 = 1 and y_1 becomes A; z_2 is not a neighbour.
  #   k = 2: w_1 = e^-1 / (e^-1 + e^-4), w_2 = e^-9 / (e^-4 + e^-9).
  c = np.array([[0.0], [1.0], [3.0]])
  y = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  sigma = 0.5**0.5
  np.testing.assert_allclose(sel.redistribute_labels(c, y, 0, sigma, 1),
                             [[1, 0], [1, 0], [0, 1]], atol=1e-12)
  w1 = np.exp(-1) / (np.exp(-1) + np.exp(-4))
  w2 = np.exp(-9) / (np.exp(-4) + np.exp(-9))
  np.testing.assert_allclose(sel.redistribute_labels(c, y, 0, sigma, 2),
                             [[1, 0], [w1, 1 - w1], [w2, 1 - w2]], rtol=1e-12)
  # Around z_1 (class B): z_0 takes w_0 = e^-1 / (e^-1 + e^-9) of B; z_2, of the same
  # class, does not move (y_1 - y_2 = 0).
  w0 = np.exp(-1) / (np.exp(-1) + np.exp(-9))
  np.testing.assert_allclose(sel.redistribute_labels(c, y, 1, sigma, 2),
                             [[1 - w0, w0], [0, 1], [0, 1]], rtol=1e-12)


def test_drop_then_add_keeps_distributions_and_counts():
  rng = np.random.default_rng(5)
  c = rng.normal(size=(60, 4))
  y = np.eye(5)[rng.integers(0, 5, 60)]
  kept, c2, y2 = sel.drop_with_redistribution(c, y, [3, 17, 40, 0, 59], 0.7, 8)
  assert len(kept) == 55 and 3 not in kept and 59 not in kept
  np.testing.assert_array_equal(c2, c[kept])
  new = rng.normal(size=(9, 4))
  c3, y3 = sel.add_with_redistribution(c2, y2, new, np.eye(5)[rng.integers(0, 5, 9)],
                                       0.7, 8)
  assert len(c3) == len(y3) == 60 - 5 + 9
  np.testing.assert_array_equal(c3[-9:], new)
  for labels in (y2, y3):
    assert np.all(labels >= 0)
    np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-12)
  assert np.any((y3 > 0) & (y3 < 1))                   # some labels did become soft


def test_drop_sequence_equals_one_by_one():
  # Dropping [a, b] = redistribute around a on the full set, remove a, then around b.
  rng = np.random.default_rng(6)
  c = rng.normal(size=(12, 2))
  y = np.eye(3)[rng.integers(0, 3, 12)]
  kept, _, y2 = sel.drop_with_redistribution(c, y, [4, 9], 1.0, 3)
  step = sel.redistribute_labels(c, y, 4, 1.0, 3)
  rest = np.delete(np.arange(12), 4)
  step = sel.redistribute_labels(c[rest], step[rest], int(np.flatnonzero(rest == 9)[0]),
                                 1.0, 3)
  np.testing.assert_allclose(y2, np.delete(step, np.flatnonzero(rest == 9), axis=0))
  np.testing.assert_array_equal(kept, np.delete(rest, np.flatnonzero(rest == 9)))
