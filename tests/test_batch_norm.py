"""fgjax.models.batch_norm: flax BatchNorm's variables, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax.models import batch_norm
from fgjax.models import layers


def _data(shape=(3, 5, 4, 6), seed=0):
  rng = np.random.default_rng(seed)
  # An offset mean and uneven scales, as conv outputs have.
  x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, shape[-1]) + rng.normal(
      size=shape[-1]) * 2
  return jnp.asarray(x, jnp.float32)


def _pair(momentum=0.9, epsilon=1e-3):
  ours = batch_norm.BatchNorm(momentum, epsilon)
  flax_bn = nn.BatchNorm(momentum=momentum, epsilon=epsilon)
  return ours, flax_bn


def test_same_variables_outputs_and_running_stats_as_flax():
  x = _data()
  ours, flax_bn = _pair()
  v_ours = ours.init(jax.random.PRNGKey(0), x, use_running_average=False)
  v_flax = flax_bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_flax)
  rng = np.random.default_rng(1)
  v = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=6), jnp.float32)},
       "batch_stats": {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
                       "var": jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)}}
  for train in (True, False):
    got, got_upd = ours.apply(v, x, use_running_average=not train,
                              mutable=["batch_stats"])
    want, want_upd = flax_bn.apply(v, x, use_running_average=not train,
                                   mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
      np.testing.assert_allclose(got_upd["batch_stats"][k], want_upd["batch_stats"][k],
                                 rtol=1e-5, atol=1e-6)
  # Train mode normalises with the batch's own statistics (NumPy reference).
  xn = np.asarray(x, np.float64)
  mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
  want = (xn - mean) / np.sqrt(var + 1e-3) * v["params"]["scale"] + v["params"]["bias"]
  got, upd = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(upd["batch_stats"]["var"],
                             0.9 * v["batch_stats"]["var"] + 0.1 * var, rtol=1e-5)


def test_training_gradient_equals_autodiff_of_flax():
  x = _data(seed=2)
  ours, flax_bn = _pair()
  v = ours.init(jax.random.PRNGKey(0), x, use_running_average=False)
  rng = np.random.default_rng(3)
  v["params"] = {"scale": jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def loss(module):
    def f(params, x):
      y, _ = module.apply({**v, "params": params}, x, use_running_average=False,
                          mutable=["batch_stats"])
      # A nonlinear loss, so the cotangent of y depends on y.
      return jnp.sum(ct * y + 0.1 * y ** 2)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(v["params"], x)

  (gp, gx), (wp, wx) = loss(ours), loss(flax_bn)
  np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-5)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(gp[k], wp[k], rtol=1e-4, atol=1e-4)
  # The input gradient of BN is orthogonal to the constant and to x per channel.
  assert np.abs(np.asarray(gx).sum((0, 1, 2))).max() < 1e-3


def test_gradients_through_the_batch_statistics():
  # mean and var are outputs too; their cotangents must reach x exactly.
  x = _data((2, 3, 3, 4), seed=4)
  scale = jnp.asarray([1.0, 2.0, 0.5, 1.5])
  bias = jnp.asarray([0.0, 1.0, -1.0, 0.5])

  def reference(x, scale, bias):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(x ** 2, (0, 1, 2)) - mean ** 2
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias)
      return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 3) + jnp.sum(jnp.sqrt(var))
    return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

  got = loss(lambda *a: batch_norm.batch_norm_train(*a, 1e-5))
  want = loss(reference)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_keep_their_dtype():
  x = _data().astype(jnp.bfloat16)
  bn = batch_norm.BatchNorm(dtype=jnp.bfloat16)
  v = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert upd["batch_stats"]["mean"].dtype == jnp.float32
  gx = jax.grad(lambda x: jnp.sum(bn.apply(v, x, use_running_average=False,
                                           mutable=["batch_stats"])[0]))(x)
  assert gx.dtype == jnp.bfloat16


@pytest.mark.parametrize("conv_impl", ["shifted", "lax"])
def test_conv_bn_variables_do_not_depend_on_the_path(conv_impl):
  # ConvBN uses batch_norm.BatchNorm on the shifted path and flax's elsewhere; the
  # checkpoints and pretrained key maps see one tree.
  x = _data((2, 6, 6, 3))
  unit = layers.ConvBN(5, 3, 1, 1, conv_impl=conv_impl)
  v = unit.init(jax.random.PRNGKey(0), x, train=True)
  assert set(v) == {"params", "batch_stats"}
  assert set(v["params"]["bn"]) == {"scale", "bias"}
  assert set(v["batch_stats"]["bn"]) == {"mean", "var"}
  ref = layers.ConvBN(5, 3, 1, 1, conv_impl="lax").apply(
      v, x, train=True, mutable=["batch_stats"])
  got = unit.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1]["batch_stats"]["bn"]["var"],
                             ref[1]["batch_stats"]["bn"]["var"], rtol=1e-5)
