"""Tests for fgjax.losses against float64 NumPy references and invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import losses


# ---- independent references ----------------------------------------------------------
def _lse(a, mask):
  a = np.where(mask, a, -np.inf)
  m = a.max(axis=1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return np.log(np.exp(a - m).sum(axis=1)) + m[:, 0]


def nca_ref(q, ql, c, cl, sigma, exclude=None):
  """Eq. (4) per query, float64, direct (q - c) differences; 0 without positives."""
  q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
  a = -((q[:, None, :] - c[None, :, :]) ** 2).sum(-1) / (2 * sigma**2)
  keep = np.ones(a.shape, bool)
  if exclude is not None:
    for i, e in enumerate(np.asarray(exclude)):
      if e >= 0:
        keep[i, e] = False
  pos = keep & (np.asarray(cl)[None, :] == np.asarray(ql)[:, None])
  lpos = _lse(a, pos)
  return np.where(np.isfinite(lpos), _lse(a, keep) - lpos, 0.0)


def nca_naive_jnp(q, ql, c, cl, sigma, exclude):
  """Plain autodiff version (no custom VJP) for gradient checks."""
  a = -jnp.sum((q[:, None] - c[None]) ** 2, -1) / (2 * sigma**2)
  keep = jnp.arange(c.shape[0])[None] != exclude[:, None]
  pos = keep & (cl[None] == ql[:, None])
  return (jax.nn.logsumexp(jnp.where(keep, a, -jnp.inf), axis=1)
          - jax.nn.logsumexp(jnp.where(pos, a, -jnp.inf), axis=1))


def _problem(seed=0, b=9, m=23, d=6, c=4):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  cen = rng.normal(size=(m, d)).astype(np.float32)
  ql = rng.integers(0, c, b).astype(np.int32)
  cl = rng.integers(0, c, m).astype(np.int32)
  cl[:c] = np.arange(c)  # every class has a center
  ex = rng.integers(-1, m, b).astype(np.int32)
  return q, ql, cen, cl, ex


# ---- nca_loss ------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 100])
def test_nca_matches_numpy(chunk_size):
  q, ql, c, cl, ex = _problem()
  fn = jax.jit(lambda s: losses.nca_loss(q, ql, c, cl, s, exclude=ex,
                                         chunk_size=chunk_size))
  for sigma in (0.05, 0.3, 1.0, 3.0):
    got = fn(sigma)
    assert got.shape == (9,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, nca_ref(q, ql, c, cl, sigma, ex), rtol=2e-5,
                               atol=2e-5, err_msg=f"sigma={sigma}")


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_nca_gradients_match_autodiff(chunk_size):
  q, ql, c, cl, ex = _problem(seed=1)
  w = jnp.linspace(0.5, 1.5, q.shape[0])  # non-uniform cotangent

  def ours(q, c, s):
    return jnp.sum(w * losses.nca_loss(q, ql, c, cl, s, exclude=ex,
                                       chunk_size=chunk_size))

  def naive(q, c, s):
    return jnp.sum(w * nca_naive_jnp(q, ql, c, cl, s, ex))

  got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, c, 0.7)
  want = jax.grad(naive, argnums=(0, 1, 2))(q, c, 0.7)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_nca_chunked_equals_unchunked_values_and_grads():
  q, ql, c, cl, ex = _problem(seed=2, b=16, m=101, d=8, c=5)
  f = lambda ch: jax.jit(jax.value_and_grad(
      lambda q, c: losses.nca_loss(q, ql, c, cl, 0.5, exclude=ex,
                                   chunk_size=ch).mean(), argnums=(0, 1)))(q, c)
  (v0, (gq0, gc0)), (v1, (gq1, gc1)) = f(None), f(16)
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  np.testing.assert_allclose(gq0, gq1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gc0, gc1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_nca_small_sigma_is_finite_and_accurate(chunk_size):
  q, ql, c, cl, ex = _problem(seed=3, m=40)
  sigma = 1e-3
  fn = lambda q, c: losses.nca_loss(q, ql, c, cl, sigma, exclude=ex,
                                    chunk_size=chunk_size)
  per, vjp = jax.vjp(jax.jit(fn), q, c)
  grads = vjp(jnp.ones_like(per))
  assert all(np.isfinite(g).all() for g in grads)
  # Losses are ~1e6 here; the float32 distance expansion keeps ~1e-5 relative.
  np.testing.assert_allclose(per, nca_ref(q, ql, c, cl, sigma, ex), rtol=1e-4,
                             atol=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_nca_query_without_positive_gives_zero_loss_and_grad(chunk_size):
  q = np.array([[0., 0.], [1., 1.], [2., 0.]], np.float32)
  c = np.array([[0., 1.], [1., 0.], [3., 3.]], np.float32)
  cl = np.array([0, 0, 1], np.int32)
  ql = np.array([2, 0, 1], np.int32)     # class 2 has no center
  ex = np.array([-1, -1, 2], np.int32)   # query 2's only positive is excluded
  fn = lambda q, c: losses.nca_loss(q, ql, c, cl, 0.5, exclude=ex,
                                    chunk_size=chunk_size)
  per, vjp = jax.vjp(jax.jit(fn), q, c)
  gq, gc = vjp(jnp.ones_like(per))
  loss = per.sum()
  assert per[0] == 0 and per[2] == 0 and per[1] > 0
  np.testing.assert_allclose(loss, nca_ref(q, ql, c, cl, 0.5, ex).sum(), rtol=1e-5,
                             atol=1e-6)
  assert np.isfinite(gq).all() and np.isfinite(gc).all()
  np.testing.assert_array_equal(gq[0], 0.0)
  np.testing.assert_array_equal(gq[2], 0.0)
  assert np.abs(gq[1]).sum() > 0


def test_nca_negative_exclude_means_none():
  q, ql, c, cl, _ = _problem(seed=4)
  fn = jax.jit(lambda ex: losses.nca_loss(q, ql, c, cl, 1.0, exclude=ex))
  none = losses.nca_loss(q, ql, c, cl, 1.0)
  neg = fn(np.full(9, -5, np.int32))
  np.testing.assert_allclose(none, neg, rtol=1e-6)
  np.testing.assert_allclose(none, nca_ref(q, ql, c, cl, 1.0), rtol=2e-5)


def test_nca_is_vmap_and_jit_compatible():
  probs = [_problem(seed=s) for s in range(3)]
  stack = [np.stack(x) for x in zip(*probs)]
  fn = jax.jit(jax.vmap(lambda q, ql, c, cl, ex: losses.nca_loss(
      q, ql, c, cl, 0.8, exclude=ex)))
  got = fn(*stack)
  for i, p in enumerate(probs):
    np.testing.assert_allclose(got[i], nca_ref(*p[:4], 0.8, p[4]), rtol=2e-5,
                               atol=2e-6)


def test_nca_traced_sigma_under_jit():
  q, ql, c, cl, ex = _problem(seed=5)
  got = jax.jit(lambda s: losses.nca_loss(q, ql, c, cl, s, exclude=ex))(0.9)
  np.testing.assert_allclose(got, nca_ref(q, ql, c, cl, 0.9, ex), rtol=2e-5)


def test_nca_validation_errors():
  q, ql, c, cl, ex = _problem()
  with pytest.raises(ValueError, match="sigma"):
    losses.nca_loss(q, ql, c, cl, 0.0)
  with pytest.raises(ValueError, match="sigma"):
    losses.nca_loss(q, ql, c, cl, -1.0)
  with pytest.raises(TypeError, match="queries"):
    losses.nca_loss(q.astype(np.int32), ql, c, cl, 1.0)
  with pytest.raises(ValueError, match="queries"):
    losses.nca_loss(q[0], ql, c, cl, 1.0)
  with pytest.raises(ValueError, match="centers"):
    losses.nca_loss(q, ql, c[:, :3], cl, 1.0)
  with pytest.raises(ValueError, match="query_labels"):
    losses.nca_loss(q, ql[:3], c, cl, 1.0)
  with pytest.raises(ValueError, match="center_labels"):
    losses.nca_loss(q, ql, c, cl[:3], 1.0)
  with pytest.raises(ValueError, match="exclude"):
    losses.nca_loss(q, ql, c, cl, 1.0, exclude=np.full(9, 23, np.int32))
  with pytest.raises(ValueError, match="chunk_size"):
    losses.nca_loss(q, ql, c, cl, 1.0, chunk_size=0)


def _pml_nca(softmax_scale):
  pml_losses = pytest.importorskip(
      "pytorch_metric_learning.losses",
      reason="pytorch-metric-learning parity test needs pytorch_metric_learning")
  distances = pytest.importorskip("pytorch_metric_learning.distances")
  return pml_losses.NCALoss(
      softmax_scale=softmax_scale,
      distance=distances.LpDistance(power=2, normalize_embeddings=False))


@pytest.mark.parametrize("tied", [True, False])
def test_nca_parity_with_pytorch_metric_learning(tied):
  torch = pytest.importorskip("torch", reason="parity test needs torch")
  sigma = 0.8
  pml = _pml_nca(1.0 / (2 * sigma**2))
  q, ql, c, cl, _ = _problem(seed=6, b=12, m=30, d=5, c=6)
  ql[0] = 5                      # class 5 has no center in the separate-set case
  cl[cl == 5] = 4
  if tied:
    # NCALoss(emb, labels): the reference set is the batch itself and
    # pytorch-metric-learning masks the diagonal (j != i).
    c, cl, ex = q, ql, np.arange(12, dtype=np.int32)
  else:
    ex = None
  qt = torch.tensor(q, dtype=torch.float64, requires_grad=True)
  if tied:
    want = pml(qt, torch.tensor(ql))
  else:
    ct = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    want = pml(qt, torch.tensor(ql), ref_emb=ct, ref_labels=torch.tensor(cl))
  want.backward()

  # pytorch-metric-learning averages only over queries with a non-zero
  # same-class probability (here: those with a positive), so weigh likewise.
  def ours(q, c):
    per = losses.nca_loss(q, ql, q if tied else c, cl, sigma, exclude=ex)
    has_pos = np.array([np.any((cl == ql[i]) & (np.arange(len(cl)) != (
        ex[i] if ex is not None else -1))) for i in range(len(ql))])
    assert has_pos.sum() < len(ql)  # the no-positive branch is exercised
    return jnp.sum(per * has_pos) / has_pos.sum()

  val, (gq, gc) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(q, c)
  np.testing.assert_allclose(val, want.item(), rtol=1e-5)
  gq_total = gq + gc if tied else gq
  np.testing.assert_allclose(gq_total, qt.grad.numpy(), rtol=1e-4, atol=1e-6)
  if not tied:
    np.testing.assert_allclose(gc, ct.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_squared_distances_and_logits():
  q, _, c, _, _ = _problem(seed=7)
  ref = ((q[:, None].astype(np.float64) - c[None]) ** 2).sum(-1)
  np.testing.assert_allclose(losses.squared_distances(q, c), ref, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(losses.rbf_logits(q, c, 2.0), -ref / 8.0, rtol=1e-5,
                             atol=1e-5)
  assert float(jnp.min(losses.squared_distances(q, q))) >= 0.0
  lse = losses.masked_logsumexp(jnp.asarray(ref), jnp.zeros(ref.shape, bool))
  assert np.all(np.isneginf(lse))


# ---- attachment / center ---------------------------------------------------------------
def test_attachment_and_center_loss():
  rng = np.random.default_rng(8)
  f = rng.normal(size=(5, 3)).astype(np.float32)
  imp = rng.normal(size=(5, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.attachment_loss(f, imp),
                             ((f - imp) ** 2).sum(1), rtol=1e-6)
  centers = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 3, 3, 1, 2], np.int32)
  np.testing.assert_allclose(losses.center_loss(f, labels, centers),
                             0.5 * ((f - centers[labels]) ** 2).sum(1), rtol=1e-6)
  with pytest.raises(ValueError, match="labels"):
    losses.center_loss(f, np.array([0, 1, 2, 3, 4], np.int32), centers)
  with pytest.raises(ValueError, match="impostors"):
    losses.attachment_loss(f, imp[:4])


# ---- ELoPE -----------------------------------------------------------------------------
def _means_ref(means, f, labels, alpha):
  out = np.array(means, np.float64)
  for c in range(len(means)):
    idx = np.flatnonzero(labels == c)
    delta = (means[c] - f[idx]).sum(0) / (1 + len(idx))
    out[c] = means[c] - alpha * delta
  return out


def _elope_ref(f, labels, means, alpha, gamma, margin):
  new = _means_ref(means, f, labels, alpha)
  l_w = ((f - new[labels]) ** 2).sum() / (2 * len(f))
  present = sorted(set(labels.tolist()))
  pairs = [(k, c) for i, k in enumerate(present) for c in present[i + 1:]]
  l_b = 0.0
  for k, c in pairs:
    l_b += max(margin - ((new[k] - new[c]) ** 2).sum(), 0.0) ** 2
  l_b = gamma * l_b / (4 * len(pairs)) if pairs else 0.0
  return l_w + l_b, new


def test_update_class_means_repeated_labels_and_gradient():
  rng = np.random.default_rng(9)
  means = rng.normal(size=(5, 4)).astype(np.float32)
  f = rng.normal(size=(7, 4)).astype(np.float32)
  labels = np.array([1, 1, 1, 3, 0, 3, 1], np.int32)
  got = jax.jit(losses.update_class_means)(means, f, labels, 0.3)
  np.testing.assert_allclose(got, _means_ref(means, f, labels, 0.3), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got)[[2, 4]], means[[2, 4]])  # absent classes
  # d mu_c / d f_n = alpha / (1 + N_c) for every coordinate: gradients flow.
  g = jax.jit(jax.grad(
      lambda f: losses.update_class_means(means, f, labels, 0.3).sum()))(f)
  counts = np.bincount(labels, minlength=5)
  np.testing.assert_allclose(g, np.repeat((0.3 / (1 + counts[labels]))[:, None], 4, 1),
                             rtol=1e-6)


def test_elope_loss_matches_reference():
  rng = np.random.default_rng(10)
  means = rng.normal(size=(6, 4)).astype(np.float32) * 0.3
  f = rng.normal(size=(8, 4)).astype(np.float32)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  labels = np.array([0, 2, 2, 5, 0, 1, 5, 5], np.int32)
  fn = lambda f: losses.elope_loss(f, labels, means, 0.5, 2.0, 1.5)
  (loss, new), vjp = jax.vjp(jax.jit(fn), f)
  want_loss, want_new = _elope_ref(f, labels, means, 0.5, 2.0, 1.5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(new, want_new, rtol=1e-5, atol=1e-6)
  # Loss gradient includes the path through the updated means (finite diff).
  (g,) = vjp((jnp.ones(()), jnp.zeros_like(new)))
  eps, (i, j) = 1e-3, (3, 1)
  fp, fm = f.copy().astype(np.float64), f.copy().astype(np.float64)
  fp[i, j] += eps
  fm[i, j] -= eps
  fd = (_elope_ref(fp, labels, means, 0.5, 2.0, 1.5)[0]
        - _elope_ref(fm, labels, means, 0.5, 2.0, 1.5)[0]) / (2 * eps)
  np.testing.assert_allclose(g[i, j], fd, rtol=1e-3, atol=1e-5)
  # new_means is state: stop-gradiented.
  (g_state,) = vjp((jnp.zeros(()), jnp.ones_like(new)))
  np.testing.assert_array_equal(g_state, 0.0)


def test_elope_single_class_batch_has_no_between_term_and_no_nan():
  rng = np.random.default_rng(11)
  means = rng.normal(size=(3, 4)).astype(np.float32)
  f = rng.normal(size=(4, 4)).astype(np.float32)
  labels = np.full(4, 2, np.int32)
  loss, g = jax.jit(jax.value_and_grad(
      lambda f: losses.elope_loss(f, labels, means, 0.5, 1.0, 2.0)[0]))(f)
  want, _ = _elope_ref(f, labels, means, 0.5, 1.0, 2.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert np.isfinite(g).all()


def test_elope_validation():
  means = np.zeros((3, 4), np.float32)
  f = np.ones((2, 4), np.float32)
  with pytest.raises(ValueError, match="labels"):
    losses.elope_loss(f, np.array([0, 3], np.int32), means, 0.5, 1.0, 1.0)
  with pytest.raises(ValueError, match="alpha"):
    losses.update_class_means(means, f, np.array([0, 1], np.int32), -0.1)
  with pytest.raises(ValueError, match="features"):
    losses.update_class_means(means, f[:, :3], np.array([0, 1], np.int32), 0.1)


def test_elope_weights_zero_rows_change_nothing():
  rng = np.random.default_rng(12)
  means = rng.normal(size=(6, 4)).astype(np.float32) * 0.3
  f = rng.normal(size=(7, 4)).astype(np.float32)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  # Rows 5, 6 weigh zero; row 6's class 3 appears nowhere else, so a leak would move
  # mean 3 and add pairs (k, 3) to L_b.
  labels = np.array([0, 2, 2, 5, 0, 1, 3], np.int32)
  w = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
  keep = w > 0
  got_means = jax.jit(losses.update_class_means)(means, f, labels, 0.4, w)
  np.testing.assert_allclose(got_means, _means_ref(means, f[keep], labels[keep], 0.4),
                             rtol=1e-5, atol=1e-6)
  loss, new = jax.jit(losses.elope_loss)(f, labels, means, 0.4, 2.0, 1.5, w)
  want_loss, want_new = _elope_ref(f[keep], labels[keep], means, 0.4, 2.0, 1.5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(new, want_new, rtol=1e-5, atol=1e-6)
  # Bool masks work too, and no gradient reaches the zero-weight rows.
  g = jax.grad(lambda f: losses.elope_loss(f, labels, means, 0.4, 2.0, 1.5,
                                           keep)[0])(f)
  np.testing.assert_array_equal(np.asarray(g)[~keep], 0.0)
  # weights=None is all ones.
  ones = losses.elope_loss(f, labels, means, 0.4, 2.0, 1.5, np.ones(7, np.float32))
  none = losses.elope_loss(f, labels, means, 0.4, 2.0, 1.5)
  np.testing.assert_allclose(ones[0], none[0], rtol=1e-6)
  np.testing.assert_allclose(ones[1], none[1], rtol=1e-6)
  # All rows zero: no nan, means unchanged.
  loss0, new0 = losses.elope_loss(f, labels, means, 0.4, 2.0, 1.5, np.zeros(7))
  assert float(loss0) == 0.0
  np.testing.assert_allclose(new0, means)
  with pytest.raises(ValueError, match="weights"):
    losses.update_class_means(means, f, labels, 0.4, w[:3])
  with pytest.raises(ValueError, match="weights"):
    losses.elope_loss(f, labels, means, 0.4, 2.0, 1.5, -w)


def test_l2_normalize_matches_numpy_and_keeps_zero_rows_differentiable():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  x[2] = 0.0
  x[3] = 1e-14  # norm below eps: divided by eps, not by its own norm
  want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  np.testing.assert_allclose(losses.l2_normalize(jnp.asarray(x)), want, rtol=1e-6)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(losses.l2_normalize(jnp.asarray(x), 1e-6),
                             x / np.maximum(norm, 1e-6), rtol=1e-6)
  w = rng.normal(size=(4, 6)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x) * w))(jnp.asarray(x))
  assert np.all(np.isfinite(g))
  # Row 0's gradient is the projection of w off the unit vector, over the norm.
  u = x[0] / np.linalg.norm(x[0])
  np.testing.assert_allclose(g[0], (w[0] - u * (u @ w[0])) / np.linalg.norm(x[0]),
                             rtol=1e-5, atol=1e-6)
  bf = losses.l2_normalize(jnp.asarray(x, jnp.bfloat16))
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), want, atol=1e-2)
