"""fgjax.models.xla_cpu: the CPU compile options are accepted, change the lowering, and
keep the results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import export
from fgjax import models
from fgjax.export import xla_predictor
from fgjax.models import xla_cpu


def test_options_only_on_cpu_and_known_to_this_jaxlib():
  assert xla_cpu.compiler_options("gpu") is None
  assert xla_cpu.compiler_options("tpu") is None
  opts = xla_cpu.compiler_options("cpu")
  want = {"xla_cpu_experimental_ynn_fusion_type":
          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
  # None only where this jaxlib rejects the (experimental) option.
  assert opts == (want if xla_cpu._supported(tuple(want.items())) else None)


def test_unknown_option_is_probed_away():
  assert not xla_cpu._supported((("xla_cpu_no_such_option_fgjax", "1"),))


def test_convolutions_leave_ynnpack_with_same_values():
  if xla_cpu.compiler_options("cpu") is None:
    pytest.skip("this jaxlib has no xla_cpu_experimental_ynn_fusion_type")
  rng = np.random.default_rng(0)
  # Large enough channel counts for XLA to hand the conv to YNNPACK by default.
  x = jnp.asarray(rng.normal(size=(2, 20, 20, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)

  def f(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y ** 2), y

  default = jax.jit(f).lower(x, w).compile().as_text()
  ours = xla_cpu.jit(f).lower(x, w).compile().as_text()
  assert "convolution(" in ours
  conv_fusions = lambda txt: [l for l in txt.splitlines()  # noqa: E731
                              if "__ynn_fusion" in l and "convolution" in l]
  assert "__ynn_fusion" in default and not conv_fusions(ours)
  np.testing.assert_allclose(xla_cpu.jit(f)(x, w)[1], jax.jit(f)(x, w)[1],
                             rtol=1e-5, atol=1e-4)


def test_xla_predictor_compiles_once_per_size_with_the_options():
  spec = models.get("small_cnn")
  module, folded = export.fold(spec.module, spec.variables, spec.bn_epsilon)
  forward = xla_predictor.make_forward(module, folded, 2, ("pooled", "map"),
                                       image_hw=(16, 16))
  assert list(forward.compiled) == [(16, 16)]  # compiled when built
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  out = forward(x)
  assert set(out) == {"pooled", "map"} and out["pooled"].shape == (2, 128)
  forward(x[:, :12, :12])
  assert list(forward.compiled) == [(16, 16), (12, 12)]
  text = forward.compiled[(16, 16)].as_text()
  assert "convolution(" in text
  if xla_cpu.compiler_options("cpu") is not None:
    assert not [l for l in text.splitlines()
                if "__ynn_fusion" in l and "convolution" in l]
  want = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))(spec.variables, x)
  np.testing.assert_allclose(out["map"], want["map"], rtol=1e-4, atol=1e-4)
