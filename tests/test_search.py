"""Tests for fgjax.search: exact (JAX) and ScaNN k-NN backends.

References are independent NumPy float64 brute force and a NumPy eq. (3) of
Lebedev et al. (Impostor Networks) summed over ALL impostors.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import search


def _ref_sq_dists(q, c):
  """(B, M) squared L2 in float64 (where the expansion is accurate enough)."""
  q = np.asarray(q, np.float64)
  c = np.asarray(c, np.float64)
  d = (q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * q @ c.T
  return np.maximum(d, 0.0)


def _assert_knn_matches(sq, idx, ref, k, rtol=1e-5, atol=1e-4):
  """Distances equal the reference; returned ids really have those distances.

  Checking ref[b, idx[b, j]] against the j-th smallest reference distance is
  robust to ties (any of the tied ids is a correct answer).
  """
  sq, idx = np.asarray(sq), np.asarray(idx)
  assert sq.dtype == np.float32 and idx.dtype == np.int32
  assert sq.shape == idx.shape == (ref.shape[0], k)
  want = np.sort(ref, axis=1)[:, :k]
  np.testing.assert_allclose(sq, want, rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.take_along_axis(ref, idx, 1), want,
                             rtol=rtol, atol=atol)
  assert np.all(np.diff(sq, axis=1) >= 0)
  # Every row holds k distinct ids.
  assert all(len(set(row)) == k for row in idx)


def _clustered(rng, m, d, num_clusters, b, noise=1.0, scale=3.0):
  centers = rng.normal(size=(num_clusters, d)) * scale
  db = centers[rng.integers(0, num_clusters, m)] + noise * rng.normal(size=(m, d))
  q = centers[rng.integers(0, num_clusters, b)] + noise * rng.normal(size=(b, d))
  return db.astype(np.float32), q.astype(np.float32)


def _recall(idx, ref, k):
  true = np.argsort(ref, axis=1)[:, :k]
  idx = np.asarray(idx)
  return np.mean([len(set(a) & set(t)) / k for a, t in zip(idx, true)])


# ---------------------------------------------------------------- exact ----


def test_exact_matches_numpy_brute_force():
  rng = np.random.default_rng(0)
  c = rng.normal(size=(300, 16)).astype(np.float32)
  q = rng.normal(size=(20, 16)).astype(np.float32)
  index = search.build_index(c, "exact")
  assert (index.backend, index.size, index.dim) == ("exact", 300, 16)
  sq, idx = index.search(q, 10)
  ref = _ref_sq_dists(q, c)
  _assert_knn_matches(sq, idx, ref, 10)
  # Continuous random data has no ties: ids must be identical.
  np.testing.assert_array_equal(idx, np.argsort(ref, axis=1)[:, :10])


def test_exact_self_query_gives_zero_distance_not_negative():
  rng = np.random.default_rng(1)
  c = (rng.normal(size=(50, 32)) * 100).astype(np.float32)  # large norms
  sq, idx = search.build_index(c).search(c, 1)
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], np.arange(50))
  assert np.all(np.asarray(sq) >= 0)
  # Cancellation error of the expansion is ~1e-7 * ||c||^2 ~ 1e-1 here.
  assert np.all(np.asarray(sq) < 1.0)


@pytest.mark.parametrize("chunk_size", [7, 64, 99])
def test_chunked_exact_equals_unchunked(chunk_size):
  rng = np.random.default_rng(2)
  c = rng.normal(size=(100, 8)).astype(np.float32)
  q = rng.normal(size=(13, 8)).astype(np.float32)
  full = search.build_index(c, "exact", chunk_size=1_000)
  chunked = search.build_index(c, "exact", chunk_size=chunk_size)
  assert full.chunk_size == 100 and chunked.chunk_size == chunk_size
  for k in (1, 10, 100):  # k=10 > chunk_size=7 exercises the merge
    sq_f, idx_f = full.search(q, k)
    sq_c, idx_c = chunked.search(q, k)
    np.testing.assert_array_equal(idx_c, idx_f)
    np.testing.assert_allclose(sq_c, sq_f, rtol=1e-6, atol=1e-6)
    _assert_knn_matches(sq_c, idx_c, _ref_sq_dists(q, c), k)


def test_exact_accepts_jax_and_float64_inputs_and_empty_batch():
  rng = np.random.default_rng(3)
  c = rng.normal(size=(40, 4))  # float64
  q = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  index = search.build_index(jnp.asarray(c, jnp.float32))
  sq, idx = index.search(q, 3)
  _assert_knn_matches(sq, idx, _ref_sq_dists(q, c), 3)
  sq64, idx64 = search.build_index(c).search(np.asarray(q), 3)
  np.testing.assert_array_equal(idx64, idx)
  sq0, idx0 = index.search(np.zeros((0, 4), np.float32), 3)
  assert sq0.shape == idx0.shape == (0, 3)


def test_exact_on_chosen_device_and_under_jit():
  rng = np.random.default_rng(9)
  c = rng.normal(size=(64, 4)).astype(np.float32)
  q = rng.normal(size=(6, 4)).astype(np.float32)
  dev = jax.devices()[-1]
  index = search.build_index(c, "exact", device=dev, chunk_size=16)
  sq, idx = index.search(q, 5)
  _assert_knn_matches(sq, idx, _ref_sq_dists(q, c), 5)
  # The exact backend is traceable, so it composes with a jitted model.
  sq_j, idx_j = jax.jit(lambda x: index.search(x, 5))(q)
  np.testing.assert_array_equal(idx_j, idx)
  np.testing.assert_allclose(sq_j, sq, rtol=1e-6)


# ---------------------------------------------------------------- scann ----


def test_scann_brute_force_matches_exact():
  pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  rng = np.random.default_rng(4)
  c, q = _clustered(rng, 3000, 32, 30, 100)
  index = search.build_index(c, "scann")
  assert index.backend == "scann" and index.brute_force
  assert (index.size, index.dim) == (3000, 32)
  ref = _ref_sq_dists(q, c)
  sq, idx = index.search(q, 20)
  _assert_knn_matches(sq, idx, ref, 20)
  assert _recall(idx, ref, 20) == 1.0
  # The thread-pool path returns the same neighbours.
  par = search.build_index(c, "scann", num_threads=2)
  sq2, idx2 = par.search(q, 20)
  np.testing.assert_array_equal(idx2, idx)
  np.testing.assert_array_equal(sq2, sq)


def test_scann_tree_ah_reorder_recall_big_m():
  """Tree + AH + reorder on M = 50,000: measured recall@10 ~0.998."""
  pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  rng = np.random.default_rng(5)
  c, q = _clustered(rng, 50_000, 64, 500, 200)
  index = search.build_index(c, "scann")
  assert not index.brute_force
  assert index.num_leaves == 224 and index.leaves_to_search == 12
  ref = _ref_sq_dists(q, c)
  for k in (10, 64):
    sq, idx = index.search(q, k)
    rec = _recall(idx, ref, k)
    assert rec >= 0.97, f"recall@{k}={rec:.4f}"
    # Distances are exact for the returned ids and sorted.
    np.testing.assert_allclose(np.asarray(sq),
                               np.take_along_axis(ref, np.asarray(idx), 1),
                               rtol=1e-5, atol=1e-3)
    assert np.all(np.diff(np.asarray(sq), axis=1) >= 0)
  # Top-1 agreement with exact search.
  _, idx_e = search.build_index(c, "exact").search(q, 1)
  _, idx_s = index.search(q, 1)
  assert np.mean(np.asarray(idx_e) == np.asarray(idx_s)) >= 0.99


def test_scann_tree_with_too_few_candidates_falls_back_to_exact():
  pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  rng = np.random.default_rng(6)
  c, q = _clustered(rng, 2000, 16, 20, 10)
  # One leaf of ~100 points cannot supply k=1000 neighbours, so ScaNN pads
  # every row with NaN and each query must take the exact fallback.
  index = search.build_index(c, "scann", brute_force_threshold=0, num_leaves=20,
                             leaves_to_search=1)
  assert not index.brute_force
  sq, idx = index.search(q, 1000)
  _assert_knn_matches(sq, idx, _ref_sq_dists(q, c), 1000)


# ------------------------------------------------------- RBF agreement ----


def _impostor_problem(seed=0, m=6000, d=64, num_classes=20, b=300):
  """Confusable clusters: 100 far-apart sites, 3 classes x 20 impostors each.

  Around each query ~60 impostors of 3 different classes compete (so the RBF
  vote over neighbours matters: the top-1 class differs from the 1-NN label
  for a few queries) while sites are far apart, so impostors beyond the 64
  nearest carry negligible kernel weight.
  """
  rng = np.random.default_rng(seed)
  sites, per_site, per_cluster = 100, 3, m // 300
  site = rng.normal(size=(sites, d)) * 3.0
  cluster = (site[:, None] + 0.2 * rng.normal(size=(sites, per_site, d)))
  cluster = cluster.reshape(-1, d)
  cluster_label = np.concatenate(
      [rng.choice(num_classes, per_site, replace=False) for _ in range(sites)])
  member = np.repeat(np.arange(sites * per_site), per_cluster)
  centers = (cluster[member] + 0.3 * rng.normal(size=(m, d))).astype(np.float32)
  labels = cluster_label[member].astype(np.int32)
  q_cluster = rng.integers(0, sites * per_site, b)
  queries = (cluster[q_cluster] + 0.3 * rng.normal(size=(b, d))).astype(np.float32)
  return centers, labels, queries


def _np_logsumexp(x, axis):
  mx = np.max(x, axis=axis, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  with np.errstate(divide="ignore"):
    return np.log(np.sum(np.exp(x - mx), axis=axis)) + np.squeeze(mx, axis)


def _np_rbf_probs(sq_dists, labels, sigma, num_classes):
  """Eq. (3): p(l) = sum_j w_j [l_j = l] / sum_j w_j over the given columns."""
  logw = -np.asarray(sq_dists, np.float64) / (2.0 * sigma**2)
  per_class = np.stack(
      [_np_logsumexp(np.where(labels == c, logw, -np.inf), axis=1)
       for c in range(num_classes)], axis=1)
  return np.exp(per_class - _np_logsumexp(logw, axis=1)[:, None])


SIGMA = np.sqrt(2.0)  # mean top-1 prob ~0.6: several neighbours share mass
C = 20
K = 64


@pytest.mark.parametrize("scann_options", [
    {},  # brute force (M = 6,000 < threshold)
    {"brute_force_threshold": 0},  # force tree + AH + reorder at M = 6,000
])
def test_rbf_rule_same_top1_through_scann_knn_as_exact_all_impostors(
    scann_options):
  """Tolerance: >= 99% top-1 agreement; |dp| <= 1e-3 for every query (brute force) or
  for >= 99% of queries (tree + AH), k = 64.

  Why not every query for the tree: ScaNN's tree training is not reproducible under CPU
  load (seen once in a parallel test run, and reproduced under load: one build in six
  missed a near impostor of one query, |dp| = 0.04, top-1 unchanged); unloaded, repeated
  builds give max |dp| = 3e-8.
  """
  pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  centers, labels, queries = _impostor_problem()
  full = _np_rbf_probs(_ref_sq_dists(queries, centers), labels[None, :], SIGMA, C)
  # Neighbours matter: probabilities are spread, and for some queries the
  # RBF vote disagrees with the 1-NN label.
  assert full.max(1).mean() < 0.8
  nn1 = labels[np.argmin(_ref_sq_dists(queries, centers), axis=1)]
  assert np.mean(full.argmax(1) != nn1) > 0

  index = search.build_index(centers, "scann", **scann_options)
  sq, idx = index.search(queries, K)
  knn = _np_rbf_probs(sq, labels[np.asarray(idx)], SIGMA, C)
  agreement = np.mean(knn.argmax(1) == full.argmax(1))
  dp = np.abs(knn - full).max(axis=1)
  assert agreement >= 0.99, agreement
  if index.brute_force:
    assert dp.max() <= 1e-3, dp.max()
  else:
    assert np.mean(dp <= 1e-3) >= 0.99, np.sort(dp)[-5:]
    assert dp.max() <= 0.1, dp.max()


def test_classify_uses_impostors_rule():
  centers, labels, queries = _impostor_problem(m=1200, d=16, b=50)
  full = _np_rbf_probs(_ref_sq_dists(queries, centers), labels[None, :], SIGMA, C)
  logp = search.classify(queries, centers, labels, SIGMA, C, k=K)
  assert logp.shape == (50, C)
  np.testing.assert_allclose(np.exp(np.asarray(logp)), full, atol=1e-3)
  other = search.build_index(centers[:100])
  with pytest.raises(ValueError, match="index"):
    search.classify(queries, centers, labels, SIGMA, C, index=other)


def test_neighbor_classifier_checks_once_and_matches_classify():
  centers, labels, queries = _impostor_problem(m=1200, d=16, b=50)
  index = search.build_index(centers)
  clf = search.NeighborClassifier(index, labels, SIGMA, C, k=K)
  np.testing.assert_allclose(np.asarray(clf(queries)), np.asarray(
      search.classify(queries, centers, labels, SIGMA, C, index=index, k=K)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(clf(queries[:1])), np.asarray(clf(queries))[:1],
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="impostor_labels"):
    search.NeighborClassifier(index, labels + C, SIGMA, C)  # out of range
  with pytest.raises(ValueError, match="impostor_labels"):
    search.NeighborClassifier(index, labels[:10], SIGMA, C)  # one per center
  with pytest.raises(ValueError, match="sigma"):
    search.NeighborClassifier(index, labels, 0.0, C)


# --------------------------------------------------------------- errors ----


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_search_errors(backend):
  if backend == "scann":
    pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  rng = np.random.default_rng(7)
  c = rng.normal(size=(30, 8)).astype(np.float32)
  q = rng.normal(size=(4, 8)).astype(np.float32)
  index = search.build_index(c, backend)
  with pytest.raises(ValueError, match=r"`k`=31 exceeds .* M=30"):
    index.search(q, 31)
  with pytest.raises(ValueError, match="`k` must be >= 1"):
    index.search(q, 0)
  with pytest.raises(TypeError, match="`k` must be an int"):
    index.search(q, 2.0)
  with pytest.raises(ValueError, match="`queries` has dimension 7"):
    index.search(q[:, :7], 3)
  with pytest.raises(ValueError, match="`queries` must be 2-D"):
    index.search(q[0], 3)
  with pytest.raises(TypeError, match="`queries` must have a floating dtype"):
    index.search(q.astype(np.int32), 3)


def test_build_errors():
  c = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="`backend` must be one of"):
    search.build_index(c, "faiss")
  with pytest.raises(ValueError, match="`centers` must be 2-D"):
    search.build_index(np.zeros((2, 3, 4), np.float32))
  with pytest.raises(ValueError, match="`centers` is empty"):
    search.build_index(np.zeros((0, 4), np.float32))
  with pytest.raises(ValueError, match="`chunk_size`"):
    search.build_index(c, chunk_size=0)
  with pytest.raises(TypeError, match="unexpected keyword"):
    search.build_index(c, "exact", num_leaves=3)


def test_scann_build_errors():
  pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  rng = np.random.default_rng(8)
  c = rng.normal(size=(500, 8)).astype(np.float32)
  with pytest.raises(ValueError, match="`leaves_to_search` must be in"):
    search.build_index(c, "scann", brute_force_threshold=0, num_leaves=5,
                       leaves_to_search=6)
  with pytest.raises(ValueError, match="`num_threads`"):
    search.build_index(c, "scann", num_threads=-1)
  bad = c.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match="NaN or inf"):
    search.build_index(bad, "scann")


def test_missing_scann_gives_install_advice(monkeypatch):
  # A None entry makes `import scann...` raise ImportError even if installed.
  monkeypatch.setitem(sys.modules, "scann.scann_ops.py", None)
  with pytest.raises(ImportError, match="pip install scann"):
    search.build_index(np.zeros((4, 2), np.float32), "scann")


def test_neighbors_returns_backend_arrays_equal_to_search():
  pytest.importorskip("scann", reason="ScaNN backend needs the scann package")
  centers, _, queries = _impostor_problem(m=600, d=16, b=7)
  for backend, kind in (("scann", np.ndarray), ("exact", jax.Array)):
    index = search.build_index(centers, backend)
    sq, idx = index.neighbors(queries, 5)
    assert isinstance(sq, kind) and isinstance(idx, kind)
    want_sq, want_idx = index.search(queries, 5)
    assert isinstance(want_sq, jax.Array)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(sq), np.asarray(want_sq))
