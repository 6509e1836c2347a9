"""Soft-label NCA loss and RBF rule: float64 NumPy references, one-hot equality with
nca_loss / rbf_log_probs (values and gradients), the Y = 0 and no-positive rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import impostors
from fgjax import losses
from fgjax.losses import soft_nca


def _problem(seed=0, b=9, m=17, d=5, classes=4):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  c = rng.normal(size=(m, d)).astype(np.float32)
  ql = rng.integers(0, classes, b).astype(np.int32)
  y = rng.random((m, classes)) * (rng.random((m, classes)) < 0.5)  # many exact zeros
  y[np.arange(m), rng.integers(0, classes, m)] += 0.5
  y = (y / y.sum(1, keepdims=True)).astype(np.float32)
  owners = rng.integers(-1, 6, m).astype(np.int32)
  ex = rng.integers(-1, 6, b).astype(np.int32)
  return q, ql, c, y, owners, ex


def _reference(q, ql, c, y, sigma, owners, ex):
  """float64: p(l | q_i) over kept centers, and L_i = -log p(l_i | q_i)."""
  q, c, y = (np.asarray(a, np.float64) for a in (q, c, y))
  d = ((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)
  w = np.exp(-d / (2 * sigma**2))
  keep = ~((owners[None, :] == ex[:, None]) & (ex[:, None] >= 0))
  w = np.where(keep, w, 0.0)
  p = (w @ y) / w.sum(1, keepdims=True)
  return p, -np.log(p[np.arange(len(q)), ql])


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_loss_and_rule_match_float64_reference(sigma):
  q, ql, c, y, owners, ex = _problem()
  p_ref, loss_ref = _reference(q, ql, c, y, sigma, owners, ex)
  loss = soft_nca.soft_nca_loss(q, ql, c, y, sigma, exclude=ex, center_owners=owners)
  lp = soft_nca.soft_rbf_log_probs(q, c, y, sigma, exclude=ex, center_owners=owners)
  np.testing.assert_allclose(np.asarray(loss), loss_ref, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)), p_ref, rtol=2e-5,
                             atol=1e-7)
  np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)).sum(1), 1.0, rtol=1e-5)


def test_gradient_matches_float64_formula():
  # dL_i/dq_i = -2s sum_j (p_ij - p+_ij)(q_i - c_j), p = softmax over kept centers,
  # p+ the Y_j[l_i]-weighted one; s = 1 / (2 sigma^2).
  q, ql, c, y, owners, ex = _problem(1)
  sigma = 0.9
  grad = jax.grad(lambda qq: soft_nca.soft_nca_loss(
      qq, ql, c, y, sigma, exclude=ex, center_owners=owners).sum())(jnp.asarray(q))
  q64, c64, y64 = (np.asarray(a, np.float64) for a in (q, c, y))
  d = ((q64[:, None] - c64[None]) ** 2).sum(-1)
  keep = ~((owners[None, :] == ex[:, None]) & (ex[:, None] >= 0))
  w = np.where(keep, np.exp(-d / (2 * sigma**2)), 0.0)
  wp = w * y64[:, ql].T
  coef = w / w.sum(1, keepdims=True) - wp / wp.sum(1, keepdims=True)
  s = 1 / (2 * sigma**2)
  ref = -2 * s * (coef[:, :, None] * (q64[:, None] - c64[None])).sum(1)
  np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_one_hot_labels_give_nca_loss_and_its_gradients(sigma):
  rng = np.random.default_rng(2)
  q = rng.normal(size=(7, 6)).astype(np.float32)
  c = rng.normal(size=(20, 6)).astype(np.float32)
  ql = rng.integers(0, 3, 7).astype(np.int32)
  cl = rng.integers(0, 3, 20).astype(np.int32)
  ex = rng.integers(-1, 20, 7).astype(np.int32)
  y = np.eye(3, dtype=np.float32)[cl]
  soft = lambda qq, cc: soft_nca.soft_nca_loss(qq, ql, cc, y, sigma, exclude=ex)  # noqa: E731
  hard = lambda qq, cc: losses.nca_loss(qq, ql, cc, cl, sigma, exclude=ex)  # noqa: E731
  np.testing.assert_allclose(np.asarray(soft(q, c)), np.asarray(hard(q, c)),
                             rtol=1e-5, atol=1e-5)
  gs = jax.grad(lambda a, b: soft(a, b).sum(), argnums=(0, 1))(q, c)
  gh = jax.grad(lambda a, b: hard(a, b).sum(), argnums=(0, 1))(q, c)
  for a, b in zip(gs, gh):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(b)).max()))


def test_one_hot_rule_is_rbf_log_probs():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(11, 4)).astype(np.float32)
  c = rng.normal(size=(30, 4)).astype(np.float32)
  cl = rng.integers(0, 5, 30).astype(np.int32)
  ex = rng.integers(-1, 30, 11).astype(np.int32)
  want = impostors.rbf_log_probs(q, impostors.ImpostorSet(c, cl), 0.6, 5, exclude=ex)
  got = soft_nca.soft_rbf_log_probs(q, c, np.eye(5, dtype=np.float32)[cl], 0.6,
                                    exclude=ex)
  np.testing.assert_allclose(np.exp(np.asarray(got)), np.exp(np.asarray(want)),
                             atol=1e-6)


def test_small_sigma_stays_finite_and_exact():
  # sigma = 0.01: exp(-d / 2 sigma^2) underflows for every center, but shifted by the
  # nearest center the loss is exact: with two centers at squared distance 1 and 2
  # from the query, L = log(1 + e^{-(2-1)/(2e-4)} ...) reduces to the gap below.
  q = np.zeros((1, 2), np.float32)
  c = np.array([[1.0, 0.0], [0.0, 2.0**0.5]], np.float32)
  y = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  loss = soft_nca.soft_nca_loss(q, np.array([0]), c, y, 0.01)
  np.testing.assert_allclose(float(loss[0]), (2.0 - 1.0) / (2 * 0.01**2), rtol=1e-4)
  g = jax.grad(lambda qq: soft_nca.soft_nca_loss(qq, np.array([0]), c, y, 0.01).sum())(q)
  assert np.all(np.isfinite(np.asarray(g)))


def test_zero_mass_rule_and_no_positive_row():
  # Query 0's label has Y = 0 on every kept center: loss 0, gradient 0. Query 1 has
  # positive mass only on center 2 (weight 0.25): the zeros of Y elsewhere give no NaN.
  q = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
  c = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], np.float32)
  y = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.25, 0.75]], np.float32)
  ql = np.array([2, 1], np.int32)
  ex = np.array([2, -1], np.int32)          # query 0 bypasses center 2
  fn = lambda qq, cc: soft_nca.soft_nca_loss(qq, ql, cc, y, 1.0, exclude=ex)  # noqa: E731
  loss = np.asarray(fn(q, c))
  w = np.exp(-np.array([1.0, 1.0, 2.0]) / 2)
  assert loss[0] == 0.0
  np.testing.assert_allclose(loss[1], -np.log(0.25 * w[2] / w.sum()), rtol=1e-6)
  gq, gc = jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1))(q, c)
  assert np.all(np.isfinite(np.asarray(gq))) and np.all(np.isfinite(np.asarray(gc)))
  assert np.all(np.asarray(gq)[0] == 0.0)


def test_every_center_excluded_gives_uniform():
  c = np.ones((2, 3), np.float32)
  lp = soft_nca.soft_rbf_log_probs(np.zeros((1, 3), np.float32), c,
                                   np.eye(4, dtype=np.float32)[[0, 1]], 1.0,
                                   exclude=np.array([7]), center_owners=np.array([7, 7]))
  np.testing.assert_allclose(np.exp(np.asarray(lp)), 0.25, rtol=1e-6)


def test_jit_and_errors():
  q, ql, c, y, owners, ex = _problem(4)
  fn = jax.jit(soft_nca.soft_nca_loss)
  np.testing.assert_allclose(np.asarray(fn(q, ql, c, y, 0.8, ex, owners)),
                             np.asarray(soft_nca.soft_nca_loss(q, ql, c, y, 0.8, ex,
                                                               owners)), rtol=1e-5)
  with pytest.raises(ValueError, match="center_probs"):
    soft_nca.soft_nca_loss(q, ql, c, y[:-1], 0.8)
  with pytest.raises(ValueError, match="sigma"):
    soft_nca.soft_rbf_log_probs(q, c, y, 0.0)
  with pytest.raises(ValueError, match="query_labels"):
    soft_nca.soft_nca_loss(q, ql + 10, c, y, 0.8)
