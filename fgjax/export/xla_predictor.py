"""The XLA:CPU forward behind engine='xla': the folded network, compiled per input size.

On XLA:CPU the two things that matter for EfficientNet-Lite0 are (i) depthwise
convolutions, which XLA lowers to a slow grouped convolution; the folded module runs
them as k*k shifted multiply-adds that XLA fuses into one loop
(`fgjax.models.cpu_ops.depthwise_conv_shifted`, chosen by conv_impl='shifted'), and
(ii) BatchNorm, which fgjax.export.fold folds into the preceding convolution
(`fgjax.models.layers.fold_batch_norm`), removing a pass over every activation. Each
input size is compiled once ahead of time for the fixed batch size with fgjax's CPU
compile options (`fgjax.models.xla_cpu.compiler_options`), so serving never
recompiles; only the requested outputs are computed (XLA drops the rest).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgjax.export._common import select_outputs
from fgjax.models import xla_cpu


def make_forward(module: nn.Module, variables: dict[str, Any], batch_size: int,
                 outputs: Sequence[str], device: Optional[jax.Device] = None,
                 image_hw: Optional[tuple[int, int]] = None
                 ) -> Callable[[np.ndarray], dict]:
  """forward(chunk (batch_size, H, W, 3) float32) -> {name: np.ndarray} on `device`.

  Args:
    module, variables: the (folded) network; called as apply(v, x, train=False).
    batch_size: the compiled batch size.
    outputs: names of the module's outputs to return.
    device: where to run; default the first CPU device.
    image_hw: (H, W) to compile for now; other sizes compile on first use.
  """
  names = tuple(outputs)
  device = device or jax.devices("cpu")[0]
  variables = jax.device_put(variables, device)
  who = type(module).__name__
  fn = jax.jit(lambda v, x: dict(zip(names, select_outputs(
      module.apply(v, x, train=False), names, who))),
               compiler_options=xla_cpu.compiler_options(device.platform))
  compiled: dict[tuple[int, int], Any] = {}
  sharding = jax.sharding.SingleDeviceSharding(device)

  def get(hw):
    if hw not in compiled:
      x = jax.ShapeDtypeStruct((batch_size,) + hw + (3,), jnp.float32,
                               sharding=sharding)
      compiled[hw] = fn.lower(variables, x).compile()
    return compiled[hw]

  if image_hw is not None:
    get(tuple(image_hw))

  def forward(chunk: np.ndarray) -> dict[str, np.ndarray]:
    out = get(tuple(chunk.shape[1:3]))(variables, jax.device_put(chunk, device))
    return {k: np.asarray(v) for k, v in out.items()}

  forward.compiled = compiled  # (H, W) -> jax.stages.Compiled, for inspection
  return forward
