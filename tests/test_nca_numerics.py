"""NCA loss numerics: float32 edge sigmas, jit/eager/chunked agreement, NaN rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import losses

EPS32 = np.finfo(np.float32).eps
# 1e-6 to 10 (losses up to ~1e12; d / (2 sigma^2) > 88 for most pairs below
# 0.3), then the float32 edges: d / (2 sigma^2) > 1e38 at 1e-19 (sigma^2 is
# subnormal there), 1 / (2 sigma^2) = inf at 1e-20 and 1e-30 (where the true
# loss overflows float32 to +inf too), sigma^2 = inf at 1e20.
SIGMAS = (1e-6, 1e-5, 1e-3, 1e-2, 0.05, 0.3, 1.0, 3.0, 10.0, 1e-13, 1e-19, 1e-20,
          1e-30, 1e20)
EAGER_SIGMAS = (1e-6, 1e-19)  # eager lax.scan recompiles on every call
# M = 23 is prime: every chunk size but 1 leaves a partial last block.
MODES = [("eager", None), ("jit", None), ("eager", 7), ("jit", 7), ("jit", 1),
         ("jit", 5)]


def _problem(seed=0, b=7, m=23, d=5, k=4):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  c = rng.normal(size=(m, d)).astype(np.float32)
  ql = rng.integers(0, k + 1, b).astype(np.int32)  # class k has no center
  cl = rng.integers(0, k, m).astype(np.int32)
  ql[:2] = 0                                       # positives on both sides
  ex = rng.integers(-1, m, b).astype(np.int32)
  return q, ql, c, cl, ex


def _logsumexp(a):
  m = a.max(axis=1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return np.log(np.exp(a - m).sum(axis=1)) + m[:, 0]


def _ref(q, ql, c, cl, sigma, ex):
  """Eq. (4) in float64 with direct differences; 0 for rows without positives."""
  q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
  a = -((q[:, None] - c[None]) ** 2).sum(-1) / (2.0 * np.float64(sigma) ** 2)
  keep = np.arange(c.shape[0])[None] != np.asarray(ex)[:, None]
  pos = keep & (np.asarray(cl)[None] == np.asarray(ql)[:, None])
  lse_all = _logsumexp(np.where(keep, a, -np.inf))
  lse_pos = _logsumexp(np.where(pos, a, -np.inf))
  with np.errstate(invalid="ignore"):
    return np.where(pos.any(axis=1), lse_all - lse_pos, 0.0)


def _assert_close(got, q, ql, c, cl, sigma, ex, msg=""):
  want = _ref(q, ql, c, cl, sigma, ex)
  # The float32 expansion ||q||^2 + ||c||^2 - 2 q.c keeps distances to about
  # eps (||q||^2 + ||c||^2) absolute; the loss multiplies them by 1/(2 sigma^2).
  sq = lambda x: (x.astype(np.float64) ** 2).sum(1).max()
  atol = 4 * EPS32 * (sq(q) + sq(c)) / (2.0 * np.float64(sigma) ** 2) + 1e-6
  got = np.asarray(got, np.float64)
  with np.errstate(over="ignore"):
    want = want.astype(np.float32).astype(np.float64)   # float32 overflow is +inf
  assert got.shape == want.shape, msg
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=msg)
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=atol, err_msg=msg)


def _loss_fn(mode, chunk, ql, cl, ex):
  fn = lambda q, c, s: losses.nca_loss(q, ql, c, cl, s, exclude=ex, chunk_size=chunk)
  return jax.jit(fn) if mode == "jit" else fn


@pytest.mark.parametrize("mode,chunk", MODES)
def test_nca_matches_float64_reference_over_sigma_grid(mode, chunk):
  q, ql, c, cl, ex = _problem()
  fn = _loss_fn(mode, chunk, ql, cl, ex)
  unchunked = _loss_fn("jit", None, ql, cl, ex)
  for sigma in SIGMAS if mode == "jit" else EAGER_SIGMAS:
    msg = f"{mode} chunk={chunk} sigma={sigma}"
    got = np.asarray(fn(q, c, sigma))
    _assert_close(got, q, ql, c, cl, sigma, ex, msg=msg)
    # The docstring promises chunked == unchunked.
    np.testing.assert_allclose(got, unchunked(q, c, sigma), rtol=1e-5, atol=1e-6,
                               err_msg=msg)


@pytest.mark.parametrize("mode,chunk", MODES[:4])
def test_nca_nan_or_inf_input_gives_nan_rows_not_zero(mode, chunk):
  q, ql, c, cl, ex = _problem(seed=1)
  fn = _loss_fn(mode, chunk, ql, cl, ex)
  clean = np.asarray(fn(q, c, 0.5))
  no_pos = np.flatnonzero(ql == 4)[0]   # its clean loss is the defined 0
  assert clean[no_pos] == 0 and no_pos not in (0, 3)

  bad_q = q.copy()
  bad_q[0, 1] = np.nan
  bad_q[3, 0] = np.inf
  bad_q[no_pos, 2] = np.nan
  got = np.asarray(fn(bad_q, c, 0.5))
  bad = np.zeros(len(q), bool)
  bad[[0, 3, no_pos]] = True
  assert np.isnan(got[bad]).all(), got
  np.testing.assert_allclose(got[~bad], clean[~bad], rtol=1e-6)
  assert np.isnan(got.mean())
  if mode == "jit":   # eager grad recompiles the scans, and adds nothing here
    grad_c = jax.jit(jax.grad(lambda c: fn(bad_q, c, 0.5).mean()))(c)
    assert np.isnan(grad_c).all()   # NaN like the loss, not finite-looking

  # A NaN center poisons every row that compares with it, only those.
  j = ex[ex >= 0][0]
  bad_c = c.copy()
  bad_c[j, 0] = np.nan
  got = np.asarray(fn(q, bad_c, 0.5))
  np.testing.assert_array_equal(np.isnan(got), ex != j)
  np.testing.assert_allclose(got[ex == j], clean[ex == j], rtol=1e-6)


def _central_diff(f, x, h):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    step = np.zeros_like(x)
    step[idx] = h
    g[idx] = (f(x + step) - f(x - step)) / (2 * h)
  return g


def _fd_grads(q, ql, c, cl, sigma, ex, w):
  """Central differences of the float64 reference. At tiny sigma the loss is
  quadratic in q, c between changes of the nearest centers, far beyond h."""
  f = lambda q, c, s: float((w * _ref(q, ql, c, cl, s, ex)).sum())
  q, c, s = q.astype(np.float64), c.astype(np.float64), np.array(sigma)
  return (_central_diff(lambda x: f(x, c, sigma), q, 1e-6),
          _central_diff(lambda x: f(q, x, sigma), c, 1e-6),
          _central_diff(lambda x: f(q, c, x), s, sigma * 1e-6))


@pytest.mark.parametrize("chunk", [None, 7])
def test_nca_gradients_at_tiny_sigma_are_finite_and_accurate(chunk):
  q, ql, c, cl, ex = _problem(seed=2, b=5, m=23, d=4)
  w = np.linspace(0.5, 1.5, len(q))
  grad = jax.jit(jax.grad(
      lambda q, c, s: jnp.sum(w * losses.nca_loss(q, ql, c, cl, s, exclude=ex,
                                                  chunk_size=chunk)),
      argnums=(0, 1, 2)))
  for sigma in (1e-6, 1e-5):
    got = grad(q, c, jnp.float32(sigma))
    s64 = float(np.float32(sigma))
    want = _fd_grads(q, ql, c, cl, s64, ex, w)
    for name, g, r in zip(("q", "c", "sigma"), got, want):
      g = np.asarray(g, np.float64)
      assert np.isfinite(g).all(), (name, sigma)
      # Gradients are ~1/sigma^2 (1/sigma^3 for sigma) times distance
      # differences; float32 distances keep ~1e-6 of those.
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max(),
                                 err_msg=f"d/d{name} sigma={sigma}")
