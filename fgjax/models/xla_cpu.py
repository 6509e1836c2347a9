"""XLA:CPU compile options for fgjax's jitted network code.

XLA:CPU hands dots, reductions and convolutions to its YNNPACK library by default. For
dense 3x3 convolutions and their gradients that is slower than XLA's own (Eigen)
convolution on the machines we measured (2-core AMD EPYC, AVX-512), e.g. SqueezeNet 1.1
at batch 32: forward 236 -> 185 ms, ResNet-18 forward 1,028 -> 841 ms, training step
0.80 -> 0.72 s (BENCHMARKS.md section 3). Dots and reductions stay on YNNPACK: moving
those too made the EfficientNet-Lite0 training step 6x slower.

`compiler_options()` is what fgjax passes as `jax.jit(..., compiler_options=...)` for
the backbone forward, training step and predictors. It is per compilation, so it does
not touch the user's other jitted code or XLA_FLAGS. The option is an experimental XLA
flag, so it is probed once and dropped (None) when this jaxlib does not know it; off
CPU it is None.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

_YNN_WITHOUT_CONVOLUTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _supported(options: tuple[tuple[str, str], ...]) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jnp.zeros((2,), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except
    # An unknown or malformed option; the default compilation is still correct.
    return False
  return True


def compiler_options(backend: Optional[str] = None) -> Optional[dict[str, str]]:
  """The compile options for network code on `backend` (default: jax's default).

  Returns a dict for jax.jit(compiler_options=...) on CPU, None elsewhere or when this
  jaxlib does not accept the option.
  """
  if (backend or jax.default_backend()) != "cpu":
    return None
  options = tuple(sorted(_YNN_WITHOUT_CONVOLUTIONS.items()))
  return dict(options) if _supported(options) else None


def jit(fun, **kwargs):
  """jax.jit with fgjax's CPU compile options (see module docstring)."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
