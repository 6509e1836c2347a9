"""Tests for fgjax.models.pooling (ELoPE global (weighted) k-max pooling + registry)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax.models import pooling


def _map(shape=(2, 3, 4, 5), seed=0):
  # Continuous random values: no ties, so the top-K cells are unique.
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_topk(x, k):
  """(N, H, W, C) -> (N, K, C) sorted descending, the NumPy reference of eq. (2)."""
  n, h, w, c = x.shape
  return -np.sort(-x.reshape(n, h * w, c), axis=1)[:, :k]


def _np_topk_mask(x, k):
  """1 at each channel's K largest cells (no ties assumed), 0 elsewhere."""
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c)
  kth = _np_topk(x, k)[:, -1:]
  return (flat >= kth).astype(np.float32).reshape(x.shape)


# --- pure functions ---------------------------------------------------------------------

def test_avg_and_max_match_numpy():
  x = _map()
  np.testing.assert_allclose(pooling.global_avg_pool(jnp.asarray(x)), x.mean((1, 2)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(pooling.global_max_pool(jnp.asarray(x)), x.max((1, 2)))


def test_kmax_extremes_are_max_and_mean():
  x = _map()
  hw = x.shape[1] * x.shape[2]
  np.testing.assert_array_equal(pooling.kmax_pool(jnp.asarray(x), 1), x.max((1, 2)))
  np.testing.assert_allclose(pooling.kmax_pool(jnp.asarray(x), hw), x.mean((1, 2)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 4, 7, 11])
def test_kmax_matches_numpy_sort(k):
  x = _map(seed=k)
  got = pooling.kmax_pool(jnp.asarray(x), k)
  assert got.shape == (2, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_topk(x, k).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_kmax_gradient_only_through_selected_cells(k):
  x = _map(seed=10 + k)
  g = np.asarray(jax.grad(lambda y: pooling.kmax_pool(y, k).sum())(jnp.asarray(x)))
  np.testing.assert_allclose(g, _np_topk_mask(x, k) / k, rtol=1e-6)


def test_kmax_ties_select_exactly_k_cells_lower_index_first():
  k = 4
  x = jnp.full((2, 3, 3, 2), 1.5, jnp.float32)
  np.testing.assert_array_equal(pooling.kmax_pool(x, k), np.full((2, 2), 1.5))
  g = np.asarray(jax.grad(lambda y: pooling.kmax_pool(y, k).sum())(x))
  np.testing.assert_allclose(g.sum((1, 2)), np.ones((2, 2)), rtol=1e-6)
  assert ((g != 0).sum((1, 2)) == k).all()
  # top_k's rule: the first K row-major positions win the tie.
  flat = g.reshape(2, 9, 2)
  np.testing.assert_array_equal(flat[:, :k], np.full((2, k, 2), 1 / k, np.float32))
  np.testing.assert_array_equal(flat[:, k:], 0)


def test_kmax_partial_tie_at_kth_value():
  # Channel values 5, 3, 3, 3, 1: K = 2 takes the 5 and the first 3 only.
  x = jnp.asarray([5., 3., 3., 3., 1.], jnp.float32).reshape(1, 1, 5, 1)
  assert float(pooling.kmax_pool(x, 2)[0, 0]) == 4.0
  g = jax.grad(lambda y: pooling.kmax_pool(y, 2).sum())(x)
  np.testing.assert_array_equal(np.asarray(g).ravel(), [0.5, 0.5, 0, 0, 0])


@pytest.mark.parametrize("k", [0, -1, 13, 2.0, True])
def test_kmax_bad_k(k):
  with pytest.raises(ValueError, match="K"):
    pooling.kmax_pool(jnp.zeros((1, 3, 4, 2)), k)


def test_kmax_error_names_k_and_hw():
  with pytest.raises(ValueError, match=r"K = 13.*H\*W = 12"):
    pooling.kmax_pool(jnp.zeros((1, 3, 4, 2)), 13)
  with pytest.raises(ValueError, match="N, H, W, C"):
    pooling.kmax_pool(jnp.zeros((3, 4, 2)), 1)


def test_dtype_is_kept():
  x = jnp.asarray(_map(), jnp.bfloat16)
  assert pooling.global_avg_pool(x).dtype == jnp.bfloat16
  assert pooling.global_max_pool(x).dtype == jnp.bfloat16
  assert pooling.kmax_pool(x, 3).dtype == jnp.bfloat16
  assert pooling.weighted_kmax_pool(x, jnp.ones(3)).dtype == jnp.bfloat16


def test_weighted_kmax_matches_eq4_reference():
  x = _map(seed=3)
  w = np.asarray([2.0, -1.0, 0.5], np.float32)
  want = np.einsum("nkc,k->nc", _np_topk(x, 3), w) / 3
  got = pooling.weighted_kmax_pool(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weighted_kmax_gradients():
  k = 4
  x = _map(seed=4)
  w = jnp.asarray([1.5, 1.0, -0.5, 0.25], jnp.float32)
  f = lambda y, v: pooling.weighted_kmax_pool(y, v).sum()  # noqa: E731
  gx, gw = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), w)
  # d/dw_k of sum_{n,d} 1/K w_k S_{n,d,k} = sum_{n,d} S_{n,d,k} / K.
  np.testing.assert_allclose(gw, _np_topk(x, k).sum((0, 2)) / k, rtol=1e-5)
  # d/dy: w_k / K on the cell holding the k-th largest value, 0 on the others.
  n, h, wd, c = x.shape
  flat = x.reshape(n, h * wd, c)
  order = np.argsort(-flat, axis=1)[:, :k]  # (N, K, C) flat positions
  want = np.zeros_like(flat)
  for i in range(n):
    for d in range(c):
      want[i, order[i, :, d], d] = np.asarray(w) / k
  np.testing.assert_allclose(np.asarray(gx).reshape(flat.shape), want, rtol=1e-6)


def test_weighted_kmax_jit_and_vmap():
  x = jnp.asarray(_map(shape=(3, 2, 4, 4, 5), seed=5))  # a stack of 3 maps
  w = jnp.asarray([1.0, 0.5, 0.25], jnp.float32)
  want = np.stack([np.einsum("nkc,k->nc", _np_topk(np.asarray(m), 3), w) / 3 for m in x])
  got = jax.jit(jax.vmap(pooling.weighted_kmax_pool, in_axes=(0, None)))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  ws = jnp.stack([w, 2 * w])  # vmap over weight vectors too
  got = jax.vmap(pooling.weighted_kmax_pool, in_axes=(None, 0))(x[0], ws)
  np.testing.assert_allclose(got[1], 2 * got[0], rtol=1e-6)
  g = jax.jit(jax.grad(lambda v: pooling.weighted_kmax_pool(x[0], v).sum()))(w)
  np.testing.assert_allclose(g, _np_topk(np.asarray(x[0]), 3).sum((0, 2)) / 3, rtol=1e-5)


def test_weighted_kmax_bad_weights():
  with pytest.raises(ValueError, match="weights"):
    pooling.weighted_kmax_pool(jnp.zeros((1, 2, 2, 1)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match=r"K = 5.*H\*W = 4"):
    pooling.weighted_kmax_pool(jnp.zeros((1, 2, 2, 1)), jnp.ones(5))


# --- modules and registry ---------------------------------------------------------------

def _outputs(seed=0):
  m = _map(shape=(2, 4, 4, 3), seed=seed)
  return {"map": jnp.asarray(m), "pooled": jnp.asarray(m.mean((1, 2)))}


def test_every_registered_pooling_builds_and_pools():
  assert set(pooling.names()) >= {"avg", "max", "kmax", "weighted_kmax"}
  assert list(pooling.names()) == sorted(pooling.names())
  outputs = _outputs()
  for name in pooling.names():
    module = pooling.make(name)
    assert module.reads == pooling.reads(name)
    x = outputs[module.reads]
    variables = module.init(jax.random.key(0), x)
    y = module.apply(variables, x)
    assert y.shape == (2, 3), name
    assert y.dtype == jnp.float32, name


def test_reads():
  assert pooling.reads("avg") == "pooled"
  for name in ("max", "kmax", "weighted_kmax"):
    assert pooling.reads(name) == "map"


def test_modules_match_functions():
  outputs = _outputs(seed=1)
  m = np.asarray(outputs["map"])
  avg = pooling.make("avg")
  np.testing.assert_array_equal(avg.apply({}, outputs["pooled"]), outputs["pooled"])
  np.testing.assert_array_equal(pooling.make("max").apply({}, outputs["map"]),
                                m.max((1, 2)))
  kmax = pooling.make("kmax")
  assert kmax.k == 4
  np.testing.assert_allclose(kmax.apply({}, outputs["map"]), _np_topk(m, 4).mean(1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooling.make("kmax", k=7).apply({}, outputs["map"]),
                             _np_topk(m, 7).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_weighted_kmax_module_starts_as_kmax(k):
  outputs = _outputs(seed=2)
  module = pooling.make("weighted_kmax", k=k)
  variables = module.init(jax.random.key(0), outputs["map"])
  w = variables["params"]["weights"]
  assert w.shape == (k,) and w.dtype == jnp.float32
  np.testing.assert_array_equal(w, np.ones(k))
  np.testing.assert_allclose(module.apply(variables, outputs["map"]),
                             pooling.make("kmax", k=k).apply({}, outputs["map"]),
                             rtol=1e-6, atol=1e-7)
  # Only the K weights are learnable: no hidden state, no other params.
  assert list(variables) == ["params"] and list(variables["params"]) == ["weights"]


def test_make_errors():
  with pytest.raises(ValueError, match="avg.*kmax.*max.*weighted_kmax"):
    pooling.make("gem")
  with pytest.raises(ValueError, match="gem"):
    pooling.reads("gem")
  with pytest.raises(ValueError, match="'p'"):
    pooling.make("kmax", p=3)
  with pytest.raises(ValueError, match="'k'"):
    pooling.make("avg", k=4)
  with pytest.raises(ValueError, match="K = 0"):
    pooling.make("kmax", k=0)
  with pytest.raises(ValueError, match=r"K = 17.*H\*W = 16"):
    module = pooling.make("weighted_kmax", k=17)
    module.init(jax.random.key(0), _outputs()["map"])


def test_register_rejects_duplicates_and_missing_reads():
  with pytest.raises(ValueError, match="already registered"):
    pooling.register("kmax")(pooling.MaxPool)
  with pytest.raises(TypeError, match="reads"):

    class NoReads(nn.Module):
      def __call__(self, x):
        return x

    pooling.register("_test_no_reads")(NoReads)
  assert "_test_no_reads" not in pooling.names()
