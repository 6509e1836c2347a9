"""Tests for fgjax.impostors: eq. (3) against a float64 NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import impostors as imp
from fgjax import losses


def probs_ref(q, centers, labels, sigma, num_classes, exclude=None):
  """Eq. (3) directly in probability space, float64 (moderate sigma only)."""
  q, centers = np.asarray(q, np.float64), np.asarray(centers, np.float64)
  d2 = ((q[:, None] - centers[None]) ** 2).sum(-1)
  w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * sigma**2))
  if exclude is not None:
    for i, e in enumerate(exclude):
      if e >= 0:
        w[i, e] = 0.0
  out = np.zeros((len(q), num_classes))
  for j, l in enumerate(labels):
    out[:, l] += w[:, j]
  return out / out.sum(1, keepdims=True)


def _set(seed=0, b=7, m=29, d=5, num_classes=6):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  centers = rng.normal(size=(m, d)).astype(np.float32)
  labels = rng.integers(0, num_classes - 1, m).astype(np.int32)  # last class empty
  return q, imp.ImpostorSet(centers, labels)


_log_probs = jax.jit(imp.rbf_log_probs, static_argnames=("num_classes", "chunk_size"))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_rbf_log_probs_matches_numpy(chunk_size):
  q, s = _set()
  ex = np.array([0, -1, 3, 28, -1, 5, 5], np.int32)
  for sigma in (0.4, 1.5):
    lp = _log_probs(q, s, sigma, num_classes=6, exclude=ex, chunk_size=chunk_size)
    want = probs_ref(q, s.centers, s.labels, sigma, 6, ex)
    assert lp.shape == (7, 6)
    np.testing.assert_allclose(np.exp(lp), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-6)
    # Class 5 has no impostor: probability exactly 0, log -inf, never NaN.
    assert np.all(np.isneginf(lp[:, 5])) and not np.isnan(lp).any()


def test_rbf_log_probs_small_sigma_is_stable():
  q, s = _set(seed=1)
  lp = _log_probs(q, s, 1e-3, num_classes=6, chunk_size=8)
  present = np.unique(s.labels)
  assert np.isfinite(lp[:, present]).all() and not np.isnan(lp).any()
  # The nearest impostor's class takes all the mass.
  d2 = ((q[:, None] - s.centers[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.argmax(lp, 1), s.labels[np.argmin(d2, 1)])
  np.testing.assert_allclose(jnp.max(lp, 1), 0.0, atol=1e-6)
  # Log-probs of other classes stay finite and match the exact log ratio.
  best_other = []
  for i in range(len(q)):
    top = s.labels[np.argmin(d2[i])]
    other = d2[i][s.labels != top].min()
    best_other.append(-(other - d2[i].min()) / (2 * 1e-6))
  second = np.sort(np.asarray(lp), 1)[:, -2]
  np.testing.assert_allclose(second, best_other, rtol=1e-3)


def test_nca_loss_is_minus_log_prob_of_the_true_class():
  # The loss of eq. (4) and the rule of eq. (3) share one kernel core.
  q, s = _set(seed=2)
  ql = np.array([0, 1, 2, 3, 4, 0, 1], np.int32)
  ex = np.arange(7, dtype=np.int32)
  lp = _log_probs(q, s, 0.7, num_classes=6, exclude=ex)
  loss = jax.jit(losses.nca_loss)(q, ql, s.centers, s.labels, 0.7, exclude=ex)
  np.testing.assert_allclose(loss, -lp[np.arange(7), ql], rtol=1e-5, atol=1e-6)


def test_every_impostor_excluded_gives_uniform():
  q = np.zeros((2, 3), np.float32)
  s = imp.ImpostorSet(np.ones((1, 3), np.float32), np.array([1], np.int32))
  lp = _log_probs(q, s, 1.0, num_classes=4, exclude=np.array([0, -1]))
  np.testing.assert_allclose(lp[0], np.log(0.25), rtol=1e-6)
  np.testing.assert_allclose(np.exp(lp[1]), [0, 1, 0, 0], atol=0)


def test_rbf_log_probs_in_evaluate_call_pattern():
  q, s = _set(seed=3)
  # fgjax.evaluate jits with sigma positional (traced) and num_classes static.
  fn = jax.jit(imp.rbf_log_probs, static_argnames=("num_classes",))
  lp = fn(jnp.asarray(q), s, 0.9, num_classes=6)
  np.testing.assert_allclose(lp, imp.rbf_log_probs(q, s, 0.9, 6), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [29, 6])
def test_rbf_log_probs_from_neighbors(k):
  q, s = _set(seed=4)
  d2 = ((q[:, None].astype(np.float64) - s.centers[None]) ** 2).sum(-1)
  idx = np.argsort(d2, 1)[:, :k].astype(np.int32)
  nd2 = np.take_along_axis(d2, idx, 1).astype(np.float32)
  lp = jax.jit(imp.rbf_log_probs_from_neighbors, static_argnames=("num_classes",))(
      nd2, idx, s.labels, 0.8, num_classes=6)
  # Reference: eq. (3) over the neighbours only (all others weigh 0).
  want = np.zeros((len(q), 6))
  for i in range(len(q)):
    w = np.exp(-(nd2[i] - nd2[i].min()) / (2 * 0.8**2))
    np.add.at(want[i], s.labels[idx[i]], w)
  want /= want.sum(1, keepdims=True)
  np.testing.assert_allclose(np.exp(lp), want, rtol=1e-5, atol=1e-7)
  assert not np.isnan(lp).any()
  if k == 29:  # all impostors: identical to the exhaustive rule
    np.testing.assert_allclose(lp, _log_probs(q, s, 0.8, num_classes=6), rtol=1e-4,
                               atol=1e-5)


def test_from_neighbors_inf_distance_weighs_zero():
  labels = np.array([0, 1, 2], np.int32)
  lp = jax.jit(imp.rbf_log_probs_from_neighbors, static_argnames=("num_classes",))(
      np.array([[0.5, np.inf]], np.float32), np.array([[0, 2]], np.int32), labels,
      1.0, num_classes=3)
  np.testing.assert_allclose(np.exp(lp), [[1.0, 0.0, 0.0]])


def test_from_neighbors_validation():
  labels = np.array([0, 1, 1], np.int32)
  d2 = np.ones((2, 2), np.float32)
  with pytest.raises(ValueError, match="exceeds"):
    imp.rbf_log_probs_from_neighbors(np.ones((2, 4), np.float32),
                                     np.zeros((2, 4), np.int32), labels, 1.0, 2)
  with pytest.raises(ValueError, match="indices"):
    imp.rbf_log_probs_from_neighbors(d2, np.array([[0, 3], [1, 2]]), labels, 1.0, 2)
  with pytest.raises(ValueError, match="impostor_labels"):
    imp.rbf_log_probs_from_neighbors(d2, np.zeros((2, 2), np.int32), labels, 1.0, 1)
  with pytest.raises(ValueError, match="sigma"):
    imp.rbf_log_probs_from_neighbors(d2, np.zeros((2, 2), np.int32), labels, 0.0, 2)
  with pytest.raises(ValueError, match="sq_dists"):
    imp.rbf_log_probs_from_neighbors(d2[:, :1], np.zeros((2, 2), np.int32), labels,
                                     1.0, 2)


def test_rbf_log_probs_validation():
  q, s = _set()
  with pytest.raises(ValueError, match="impostors.labels"):
    imp.rbf_log_probs(q, s, 1.0, num_classes=3)
  with pytest.raises(ValueError, match="queries"):
    imp.rbf_log_probs(q[:, :2], s, 1.0, num_classes=6)
  with pytest.raises(TypeError, match="num_classes"):
    imp.rbf_log_probs(q, s, 1.0, num_classes=6.0)
  with pytest.raises(ValueError, match="exclude"):
    imp.rbf_log_probs(q, s, 1.0, 6, exclude=np.full(7, 29, np.int32))


def test_init_impostors_rescales_to_unit_mean_norm():
  rng = np.random.default_rng(5)
  emb = (rng.normal(size=(10, 4)) * 7.0).astype(np.float32)
  labels = rng.integers(0, 3, 10)
  s, scale = imp.init_impostors(emb, labels)
  np.testing.assert_allclose(scale, np.linalg.norm(emb, axis=1).mean(), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(s.centers, axis=1).mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s.centers * scale, emb, rtol=1e-6)
  assert s.labels.dtype == jnp.int32
  # A pytree with exactly two leaves, so it can live in a params tree.
  assert len(jax.tree.leaves(s)) == 2
  with pytest.raises(ValueError, match="mean L2 norm"):
    imp.init_impostors(np.zeros((3, 4), np.float32), np.zeros(3, np.int32))
  s0, scale0 = jax.jit(imp.init_impostors)(np.zeros((3, 4), np.float32),
                                           np.zeros(3, np.int32))
  assert float(scale0) == 1.0 and np.all(np.asarray(s0.centers) == 0)


def test_entropy():
  c = 5
  uniform = np.full((1, c), np.log(1 / c), np.float32)
  onehot = np.array([[0.0] + [-np.inf] * (c - 1)], np.float32)
  p = np.array([[0.5, 0.25, 0.25, 0.0, 0.0]], np.float32)
  with np.errstate(divide="ignore"):
    lp = np.log(p)
  got = imp.entropy_from_log_probs(np.concatenate([uniform, onehot, lp]))
  np.testing.assert_allclose(got, [np.log(c), 0.0, 1.5 * np.log(2)], rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(imp.entropy_from_probs(p), [1.5 * np.log(2)], rtol=1e-6)
  g = jax.grad(lambda x: imp.entropy_from_log_probs(x).sum())(jnp.asarray(onehot))
  assert np.isfinite(g).all()
