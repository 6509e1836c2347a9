"""The CPU rewrites of convolutions and pooling (fgjax.models.cpu_ops, layers): values
and gradients against lax and NumPy, and a whole train step against conv_impl='lax'."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import models
from fgjax.models import cpu_ops
from fgjax.models.cpu_ops import separable
from fgjax.models import layers


@pytest.mark.parametrize("size,kernel,stride,want", [
    (224, 3, 2, (0, 1)), (112, 3, 1, (1, 1)), (56, 5, 2, (1, 2)), (7, 5, 2, (2, 2)),
    (5, 1, 1, (0, 0)), (6, 3, 3, (0, 0))])
def test_tf_same_padding_known_values(size, kernel, stride, want):
  assert layers.tf_same_padding(size, kernel, stride) == want
  lo, hi = want
  assert (size + lo + hi - kernel) // stride + 1 == -(-size // stride)


@pytest.mark.parametrize("stride,pads", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (1, 2)))])
def test_depthwise_shifted_matches_numpy(stride, pads):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 8, 5)).astype(np.float32)
  w = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
  got = np.asarray(cpu_ops.depthwise_conv_shifted(jnp.asarray(x), jnp.asarray(w),
                                                 stride, pads))
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - 3) // stride + 1
  wo = (xp.shape[2] - 3) // stride + 1
  want = np.zeros((2, ho, wo, 5), np.float64)
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
      want[:, i, j, :] = np.einsum("nhwc,hwc->nc", patch, w[:, :, 0, :])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lax = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), (stride, stride),
                                     pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=5)
  np.testing.assert_allclose(got, np.asarray(lax), rtol=1e-5, atol=1e-5)


def _lax_depthwise(x, w, stride, pads):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


@pytest.mark.parametrize("size,kernel,stride,pads", [
    ((7, 8), 3, 1, ((1, 1), (1, 1))), ((7, 8), 3, 2, ((0, 1), (1, 2))),
    ((9, 9), 5, 2, ((1, 2), (1, 2))), ((6, 5), 5, 1, ((2, 2), (2, 2))),
    ((8, 8), 3, 2, ((0, 1), (0, 1))), ((10, 7), 3, 3, ((0, 0), (1, 0))),
    ((6, 5), 5, 1, ((1, 3), (2, 0))), ((11, 10), 7, 3, ((3, 3), (2, 4)))])
@pytest.mark.parametrize("batch_chunks", [1, 3])
def test_depthwise_custom_vjp_matches_lax_gradients(size, kernel, stride, pads,
                                                    batch_chunks, monkeypatch):
  # The hand-written VJP (polyphase kernel gradient, dilated input gradient; kernels
  # above 3x3 take the input gradient as a correlation) against autodiff of XLA's
  # grouped convolution, for odd/even sizes, TF-SAME and other asymmetric pads,
  # strides 1-3, a cotangent that is not all ones, and the kernel gradient whole or
  # accumulated over batch chunks (a fori_loop).
  batch = 6
  if batch_chunks > 1:
    image_bytes = 4 * 4 * ((size[0] + sum(pads[0])) * (size[1] + sum(pads[1]))
                           + size[0] * size[1])  # an upper bound on (xp, g) per image
    monkeypatch.setattr(separable, "_KERNEL_GRAD_CHUNK_BYTES",
                          image_bytes * batch // batch_chunks)
    monkeypatch.setattr(separable, "_KERNEL_GRAD_CHUNK_MAX_IMAGE_BYTES", image_bytes)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(batch, *size, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)), jnp.float32)
  out = _lax_depthwise(x, w, stride, pads)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  got_y, vjp = jax.vjp(lambda a, b: cpu_ops.depthwise_conv_shifted(a, b, stride, pads), x, w)
  want_y, want_vjp = jax.vjp(lambda a, b: _lax_depthwise(a, b, stride, pads), x, w)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(vjp)(g))
  assert ("scan" in jaxpr or "while" in jaxpr) == (batch_chunks > 1)
  for got, want in zip(jax.jit(vjp)(g), want_vjp(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_depthwise_custom_vjp_second_order():
  # grad-of-grad goes through the hand-written backward (it is plain JAX code).
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 3)), jnp.float32)
  pads = ((1, 1), (1, 1))

  def gnorm(f, w):
    return jnp.sum(jax.grad(lambda a: jnp.sum(f(a, w) ** 2))(x) ** 2)

  got = jax.grad(lambda w: gnorm(lambda a, b: cpu_ops.depthwise_conv_shifted(
      a, b, 1, pads), w))(w)
  want = jax.grad(lambda w: gnorm(lambda a, b: _lax_depthwise(a, b, 1, pads), w))(w)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("stride,size", [(1, (5, 6)), (2, (7, 6))])
def test_pointwise_conv_matches_lax_conv_and_its_gradients(stride, size):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, *size, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 5, 7)), jnp.float32)
  lax_conv = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
      a, b, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got_y, vjp = jax.vjp(lambda a, b: cpu_ops.pointwise_conv(a, b[0, 0], stride), x, w)
  want_y, want_vjp = jax.vjp(lax_conv, x, w)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=want_y.shape), jnp.float32)
  for got, want in zip(vjp(g), want_vjp(g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel,size", [((3, 3), (5, 6)), ((4, 2), (6, 5)), ((1, 3), (3, 4))])
def test_conv_same_matches_lax_conv_and_its_gradients(kernel, size):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)
  lax_conv = lambda a, b: jax.lax.conv_general_dilated(  # noqa: E731
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got_y, vjp = jax.vjp(cpu_ops.conv_same, x, w)
  want_y, want_vjp = jax.vjp(lax_conv, x, w)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=want_y.shape), jnp.float32)
  for got, want in zip(vjp(g), want_vjp(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # Inside a loop body (where it is meant to be used) it computes the same gradients.
  vjp_of = lambda a, b: jax.vjp(cpu_ops.conv_same, a, b)[1](g)  # noqa: E731
  looped = jax.jit(lambda a, b: jax.lax.scan(
      lambda c, _: (c, vjp_of(a, b)), 0, None, length=2)[1])
  for got, want in zip(looped(x, w), want_vjp(g)):
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_train_step_cpu_rewrites_equal_plain_lax(name):
  # Train mode, whole network: every CPU rewrite (shifted depthwise, 1x1 dots, the
  # batch-norm VJP, pooling) against conv_impl='lax' (lax convolutions, flax
  # BatchNorm): loss, running statistics and the gradient of every parameter. In
  # float64, because train-mode BN over a 3-image batch amplifies float32 rounding
  # (ResNet-18's gradients differ by up to 3% in float32, by 2e-14 in float64).
  with jax.enable_x64(True):
    spec = models.get(name, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 64, 64, 3)), jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), spec.variables["params"])

    def grads(module):
      def loss(params):
        out, upd = module.apply({**spec.variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.mean(out["pooled"] ** 2), upd
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_got, upd_got), g_got = grads(spec.module)
    (l_want, upd_want), g_want = grads(spec.module.clone(conv_impl="lax"))
  np.testing.assert_allclose(l_got, l_want, rtol=1e-10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
               upd_got, upd_want)
  flat_got = jax.tree_util.tree_leaves_with_path(g_got)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(g_want))
  assert len(flat_got) == len(flat_want) > 20
  for path, g in flat_got:
    w = np.asarray(flat_want[path])
    assert g.dtype == np.float64
    # (+ an absolute 1e-13: some gradients are exactly zero, e.g. a BN bias feeding
    # another train-mode BN, and come out as +-1e-17 rounding.)
    assert np.abs(np.asarray(g) - w).max() <= 1e-9 * np.abs(w).max() + 1e-13, path


def test_conv_impl_lax_keeps_every_conv_a_convolution():
  # The ONNX exporter translates conv_general_dilated; 'auto' turns 1x1 convs into dots.
  conv = layers.Conv2D(8, 1)
  x = jnp.ones((1, 4, 4, 3))
  params = conv.init(jax.random.PRNGKey(0), x)
  prims = lambda m: {e.primitive.name for e in  # noqa: E731
                     jax.make_jaxpr(lambda v: m.apply(v, x))(params).jaxpr.eqns}
  assert "dot_general" in prims(conv) and "conv_general_dilated" not in prims(conv)
  lax_conv = layers.Conv2D(8, 1, conv_impl="lax")
  assert "conv_general_dilated" in prims(lax_conv)
  np.testing.assert_allclose(conv.apply(params, x), lax_conv.apply(params, x), rtol=1e-6)
  with pytest.raises(ValueError, match="conv_impl='fast'"):
    layers.Conv2D(8, 1, conv_impl="fast").apply(params, x)


def test_max_pool_torch_ceil_mode_matches_numpy():
  x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1)[:, ::-1]
  got = np.asarray(layers.max_pool_torch(jnp.asarray(x), 3, 2, ceil_mode=True))
  # torch: out = ceil((8 - 3) / 2) + 1 = 4; the last window covers rows 6..7 only.
  assert got.shape == (2, 4, 4, 1)
  for i in range(4):
    for j in range(4):
      np.testing.assert_array_equal(
          got[:, i, j, 0], x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, 0].max(axis=(1, 2)))


def _numpy_max_pool_first_max(x, g, kernel, stride, padding, out_hw):
  """Forward and PyTorch's gradient rule (first maximum in row-major window order)."""
  n, h, w, c = x.shape
  ho, wo = out_hw
  y = np.zeros((n, ho, wo, c), x.dtype)
  dx = np.zeros_like(x)
  for b in range(n):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          best, arg = -np.inf, None
          for di in range(kernel):
            for dj in range(kernel):
              r, q = i * stride - padding + di, j * stride - padding + dj
              if 0 <= r < h and 0 <= q < w and x[b, r, q, ch] > best:
                best, arg = x[b, r, q, ch], (r, q)
          y[b, i, j, ch] = best
          dx[b, arg[0], arg[1], ch] += g[b, i, j, ch]
  return y, dx


@pytest.mark.parametrize("size,padding,ceil_mode", [
    ((8, 8), 0, True), ((9, 7), 0, True), ((9, 10), 1, False), ((8, 7), 0, False)])
@pytest.mark.parametrize("impl", ["shifted", "lax"])
def test_max_pool_torch_values_and_first_max_gradient(size, padding, ceil_mode, impl):
  # Small integers make ties common, which is where the gradient rules differ: autodiff
  # of a max chain splits ties, PyTorch (and the shifted VJP) route to the first one.
  rng = np.random.default_rng(4)
  x = rng.integers(0, 3, size=(2, *size, 3)).astype(np.float32)
  y, vjp = jax.vjp(lambda a: layers.max_pool_torch(a, 3, 2, padding, ceil_mode, impl),
                   jnp.asarray(x))
  g = rng.normal(size=y.shape).astype(np.float32)
  want_y, want_dx = _numpy_max_pool_first_max(x, g, 3, 2, padding, y.shape[1:3])
  np.testing.assert_array_equal(np.asarray(y), want_y)
  if impl == "shifted":
    np.testing.assert_allclose(np.asarray(jax.jit(vjp)(jnp.asarray(g))[0]), want_dx,
                               rtol=1e-6, atol=1e-6)
  else:  # XLA's select_and_scatter picks some maximum: the total is what must agree.
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]).sum(), want_dx.sum(),
                               rtol=1e-5)


def _conv_then_max_pool(x, k, conv_stride, conv_pads, pool, stride, padding, ceil):
  y = jax.lax.conv_general_dilated(x, k, (conv_stride, conv_stride), conv_pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  pads, _ = cpu_ops.pool_geometry(y.shape[1:3], pool, stride, padding, ceil)
  return nn.max_pool(y, (pool, pool), (stride, stride), padding=pads)


@pytest.mark.parametrize("hw,cin,cout,kernel,conv_stride,conv_pads,pool,stride,pad,ceil", [
    ((23, 24), 3, 8, 3, 2, ((0, 0), (0, 0)), 3, 2, 0, True),    # SqueezeNet stem
    ((32, 33), 3, 5, 7, 2, ((3, 3), (3, 3)), 3, 2, 1, False),   # ResNet-style stem
    ((19, 20), 4, 6, 3, 1, ((1, 1), (1, 1)), 2, 2, 0, False),
    ((20, 21), 2, 3, 3, 1, ((1, 1), (1, 1)), 3, 1, 1, False),   # stride-1 pool
    ((17, 18), 3, 4, 5, 3, ((2, 1), (0, 2)), 3, 2, 0, True)])   # odd stride and pads
def test_conv_max_pool_values_and_gradients(hw, cin, cout, kernel, conv_stride,
                                            conv_pads, pool, stride, pad, ceil):
  # The fused VJP (per-phase im2col GEMMs) against autodiff of lax conv +
  # reduce_window; continuous random values make ties (where rules differ) absent.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *hw, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
  args = (conv_stride, conv_pads, pool, stride, pad, ceil)
  y, vjp = jax.vjp(lambda a, b: cpu_ops.conv_max_pool(a, b, *args), x, k)
  want_y, want_vjp = jax.vjp(lambda a, b: _conv_then_max_pool(a, b, *args), x, k)
  assert y.shape == want_y.shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for got, want in zip(jax.jit(vjp)(g), want_vjp(g)):
    scale = float(jnp.abs(want).max())
    assert scale > 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)


def test_conv_relu_max_pool_shifted_equals_lax_order():
  # relu(conv_max_pool + b) on CPU must equal max_pool(relu(conv + b)), values and
  # parameter gradients, with a bias that makes some windows all-negative.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 21, 19, 3)), jnp.float32)
  make = lambda impl: layers.ConvReluMaxPool(  # noqa: E731
      6, 3, 2, 0, pool_kernel=3, pool_stride=2, ceil_mode=True, conv_impl=impl)
  params = make("lax").init(jax.random.PRNGKey(0), x)
  params["params"]["bias"] = jnp.linspace(-2.0, 1.0, 6)
  loss = lambda impl: lambda p: jnp.sum(make(impl).apply(p, x) ** 2)  # noqa: E731
  outs = {impl: jax.jit(make(impl).apply)(params, x) for impl in ("shifted", "lax")}
  assert float((outs["lax"] == 0).mean()) > 0.1  # the ReLU is active somewhere
  np.testing.assert_allclose(outs["shifted"], outs["lax"], rtol=1e-6, atol=1e-6)
  grads = {impl: jax.grad(loss(impl))(params)["params"] for impl in ("shifted", "lax")}
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(grads["shifted"][name], grads["lax"][name], rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(grads["lax"][name]).max()))
