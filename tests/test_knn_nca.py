"""k-NN NCA loss: float64 NumPy reference, equality with nca_loss at k = M, masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import losses

EPS32 = np.finfo(np.float32).eps


def _problem(seed=0, b=8, m=13, d=4, k=6, classes=2):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  c = rng.normal(size=(m, d)).astype(np.float32)
  ql = rng.integers(0, classes, b).astype(np.int32)
  cl = rng.integers(0, classes, m).astype(np.int32)
  idx = rng.integers(0, m, (b, k)).astype(np.int32)   # duplicates likely
  ex = rng.integers(-1, m, b).astype(np.int32)
  ex[:2] = idx[:2, 1]                                   # own impostor inside the list
  ql[2] = classes                                       # row 2: no positive at all
  return q, ql, c, cl, idx, ex


def _lse(a):
  m = a.max(axis=1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return np.log(np.exp(a - m).sum(axis=1)) + m[:, 0]


def _masks(idx, ex, ql, cl):
  """Kept entries (first occurrence, not excluded) and same-class kept entries."""
  first = np.zeros(idx.shape, bool)
  for i, row in enumerate(idx):
    _, pos = np.unique(row, return_index=True)
    first[i, pos] = True
  keep = first & (idx != np.asarray(ex)[:, None])
  return keep, keep & (np.asarray(cl)[idx] == np.asarray(ql)[:, None])


def _ref(q, ql, c, cl, idx, sigma, ex):
  """(loss (B,), dq, dc, dsigma) of sum(loss), float64, direct differences."""
  q, c, sigma = np.asarray(q, np.float64), np.asarray(c, np.float64), np.float64(sigma)
  diff = c[idx] - q[:, None]                              # (B, k, d)
  dist = (diff ** 2).sum(-1)
  s = 1.0 / (2.0 * sigma ** 2)
  keep, pos = _masks(idx, ex, ql, cl)
  a = -s * dist
  lse_all = _lse(np.where(keep, a, -np.inf))
  lse_pos = _lse(np.where(pos, a, -np.inf))
  has = pos.any(axis=1)
  loss = np.where(has, lse_all - lse_pos, 0.0)
  with np.errstate(invalid="ignore", over="ignore"):
    p = np.where(keep, np.exp(a - lse_all[:, None]), 0.0)
    pp = np.where(pos, np.exp(a - lse_pos[:, None]), 0.0)
  big_d = np.where(has[:, None], p - pp, 0.0)             # dL/da
  dq = 2 * s * (big_d[..., None] * diff).sum(1)
  dc = np.zeros_like(c)
  np.add.at(dc, idx, -2 * s * big_d[..., None] * diff)
  dsigma = (big_d * dist).sum() * 2 * s / sigma
  return loss, dq, dc, dsigma


def _grads(fn, q, c, sigma):
  return jax.grad(lambda q, c, s: fn(q, c, s).sum(), (0, 1, 2))(q, c, jnp.float32(sigma))


def _knn(ql, cl, idx, ex, jit=True):
  fn = lambda q, c, s: losses.knn_nca_loss(q, ql, c, cl, idx, s, exclude=ex)  # noqa: E731
  return jax.jit(fn) if jit else fn


def test_reference_gradient_matches_finite_differences():
  q, ql, c, cl, idx, ex = _problem()
  q, c = q.astype(np.float64), c.astype(np.float64)
  _, dq, dc, dsigma = _ref(q, ql, c, cl, idx, 0.8, ex)
  h = 1e-6
  for x, g in ((q, dq), (c, dc)):
    num = np.zeros_like(x)
    for pos in np.ndindex(x.shape):
      old = x[pos]
      x[pos] = old + h
      up = _ref(q, ql, c, cl, idx, 0.8, ex)[0].sum()
      x[pos] = old - h
      down = _ref(q, ql, c, cl, idx, 0.8, ex)[0].sum()
      x[pos] = old
      num[pos] = (up - down) / (2 * h)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7)
  num = (_ref(q, ql, c, cl, idx, 0.8 + h, ex)[0].sum()
         - _ref(q, ql, c, cl, idx, 0.8 - h, ex)[0].sum()) / (2 * h)
  np.testing.assert_allclose(dsigma, num, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_matches_float64_reference(jit, sigma):
  q, ql, c, cl, idx, ex = _problem()
  fn = _knn(ql, cl, idx, ex, jit)
  want, dq, dc, dsigma = _ref(q, ql, c, cl, idx, sigma, ex)
  got = np.asarray(fn(q, c, sigma))
  assert got[2] == 0.0 and want[2] == 0.0          # no-positive row
  assert (want > 0.05).sum() >= 4                   # most rows carry a real loss
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gq, gc, gs = _grads(fn, q, c, sigma)
  np.testing.assert_allclose(gq, dq, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gc, dc, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gs, dsigma, rtol=1e-4)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0])
def test_all_m_neighbours_equal_nca_loss(sigma):
  """Every row lists all M centers (in its own random order): nca_loss exactly."""
  q, ql, c, cl, _, ex = _problem(1, b=9, m=11)
  rng = np.random.default_rng(5)
  perm = np.stack([rng.permutation(11) for _ in range(9)]).astype(np.int32)
  knn = _knn(ql, cl, perm, ex)
  full = jax.jit(lambda q, c, s: losses.nca_loss(q, ql, c, cl, s, exclude=ex))
  want = np.asarray(full(q, c, sigma))
  assert (want > 0.05).sum() >= 3
  np.testing.assert_allclose(knn(q, c, sigma), want, rtol=1e-5, atol=1e-6)
  for got, ref in zip(_grads(knn, q, c, sigma), _grads(full, q, c, sigma)):
    scale = np.abs(np.asarray(ref)).max()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale)


def test_rows_never_selected_get_exactly_zero_gradient():
  q, ql, c, cl, idx, ex = _problem(2, m=20, k=3)
  # Row 0's own impostor is the only entry that selects center 19: excluded, so it is
  # never kept either.
  idx = np.where(idx == 19, 18, idx)
  idx[0, 2], ex[0] = 19, 19
  _, gc, _ = _grads(_knn(ql, cl, idx, ex), q, c, 0.7)
  gc = np.asarray(gc)
  never = np.setdiff1d(np.arange(20), np.unique(idx))
  assert never.size >= 3
  assert np.all(gc[never] == 0.0) and np.all(gc[19] == 0.0)
  np.testing.assert_allclose(gc, _ref(q, ql, c, cl, idx, 0.7, ex)[2], rtol=1e-4,
                             atol=1e-6)
  # Selected rows do get gradient (those seen only by rows without a positive not).
  used = np.setdiff1d(np.unique(idx), [19])
  assert np.count_nonzero(np.abs(gc[used]).sum(1)) >= used.size // 2


def test_own_impostor_inside_the_list_is_excluded():
  q, ql, c, cl, _, _ = _problem(3, b=4, m=10)
  ql[:] = 0
  cl[:] = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
  idx = np.array([[0, 1, 2, 3]] * 4, np.int32)
  ex = np.array([0, 2, -1, 9], np.int32)   # in the list, in it, none, not in it
  got = np.asarray(losses.knn_nca_loss(q, ql, c, cl, idx, 0.6, exclude=ex))
  without = np.array([[1, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2]], np.int32)
  want = _ref(q, ql, c, cl, without, 0.6, -np.ones(4, np.int32))[0]
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5)
  full = np.asarray(losses.knn_nca_loss(q, ql, c, cl, idx, 0.6))
  np.testing.assert_allclose(got[2:], full[2:], rtol=1e-6)   # nothing to exclude
  assert np.all(np.abs(got[:2] - full[:2]) > 1e-5)           # exclusion changed it


def test_duplicates_count_once_and_order_does_not_matter():
  q, ql, c, cl, _, _ = _problem(4, b=3, m=6)
  ql[:] = 1
  cl[:] = [1, 0, 1, 0, 0, 1]
  distinct = np.array([[0, 1, 3]] * 3, np.int32)
  with_dups = np.array([[0, 0, 1, 3], [3, 1, 3, 0], [1, 3, 0, 0]], np.int32)
  want = np.asarray(losses.knn_nca_loss(q, ql, c, cl, distinct, 0.5))
  fn = _knn(ql, cl, with_dups, None)
  np.testing.assert_allclose(fn(q, c, 0.5), want, rtol=1e-6)
  ref = _ref(q, ql, c, cl, with_dups, 0.5, -np.ones(3, np.int32))
  np.testing.assert_allclose(want, ref[0], rtol=1e-5)
  gq, gc, _ = _grads(fn, q, c, 0.5)
  gq0, gc0, _ = _grads(_knn(ql, cl, distinct, None), q, c, 0.5)
  np.testing.assert_allclose(gq, gq0, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gc, gc0, rtol=1e-5, atol=1e-7)


def test_no_positive_rows_have_zero_loss_and_gradient():
  q, ql, c, cl, _, _ = _problem(5, b=3, m=6)
  cl[:] = [0, 0, 1, 1, 2, 2]
  ql[:] = [0, 1, 2]
  # Row 0: only class-1/2 neighbours; row 1: its one positive (2) is excluded.
  idx = np.array([[2, 3, 4], [2, 0, 5], [4, 0, 1]], np.int32)
  ex = np.array([-1, 2, -1], np.int32)
  fn = _knn(ql, cl, idx, ex)
  loss = np.asarray(fn(q, c, 0.4))
  assert loss[0] == 0.0 and loss[1] == 0.0 and loss[2] > 0
  gq, gc, _ = _grads(lambda q, c, s: fn(q, c, s)[:2], q, c, 0.4)
  assert np.all(np.asarray(gq) == 0.0) and np.all(np.asarray(gc) == 0.0)


@pytest.mark.parametrize("sigma", [1e-2, 1e-3, 1e-5])
def test_large_distances_and_small_sigma_stay_finite(sigma):
  q, ql, c, cl, idx, ex = _problem(6)
  q, c = 30 * q, 30 * c                    # distances ~ 1e3-1e4, logits up to ~1e14
  want = _ref(q, ql, c, cl, idx, sigma, ex)[0]
  got = np.asarray(_knn(ql, cl, idx, ex)(q, c, sigma), np.float64)
  assert np.all(np.isfinite(want)) and want.max() > 1e6
  assert np.all(np.isfinite(got))
  # Direct differences round each distance to ~eps * distance; the loss scales it by
  # 1 / (2 sigma^2).
  dist = ((np.asarray(c, np.float64)[idx] - np.asarray(q, np.float64)[:, None]) ** 2)
  atol = 4 * EPS32 * dist.sum(-1).max() / (2 * sigma ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  gq, gc, _ = _grads(_knn(ql, cl, idx, ex), q, c, sigma)
  if sigma >= 1e-3:  # gradients ~ d / sigma^2 fit float32 down to here
    assert np.all(np.isfinite(gq)) and np.all(np.isfinite(gc))


def test_bad_index_under_jit_is_nan_in_its_row_only():
  q, ql, c, cl, idx, ex = _problem(7)
  idx[3, 0] = 13                           # M = 13: out of range
  got = np.asarray(_knn(ql, cl, idx, ex)(q, c, 0.5))
  assert np.isnan(got[3]) and np.all(np.isfinite(np.delete(got, 3)))


def test_input_errors():
  q, ql, c, cl, idx, ex = _problem()
  with pytest.raises(ValueError, match=r"`neighbor_idx` values must lie in \[0, 13\)"):
    losses.knn_nca_loss(q, ql, c, cl, np.full_like(idx, 13), 0.5)
  with pytest.raises(ValueError, match=r"`neighbor_idx` values must lie in \[0, 13\)"):
    losses.knn_nca_loss(q, ql, c, cl, np.full_like(idx, -1), 0.5)
  with pytest.raises(TypeError, match="`neighbor_idx` must be an integer array"):
    losses.knn_nca_loss(q, ql, c, cl, idx.astype(np.float32), 0.5)
  with pytest.raises(ValueError, match="`neighbor_idx` must have rank 2"):
    losses.knn_nca_loss(q, ql, c, cl, idx[:, 0], 0.5)
  with pytest.raises(ValueError, match="axis 0 of `neighbor_idx` must equal axis 0"):
    losses.knn_nca_loss(q, ql, c, cl, idx[:3], 0.5)
  with pytest.raises(ValueError, match=r"\(B, 0\)"):
    losses.knn_nca_loss(q, ql, c, cl, idx[:, :0], 0.5)
  with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
    losses.knn_nca_loss(q, ql, c, cl, idx, 0.0)
  with pytest.raises(ValueError, match=r"`exclude` values must lie"):
    losses.knn_nca_loss(q, ql, c, cl, idx, 0.5, exclude=np.full_like(ex, 13))
