"""Forward + backward time of each EfficientNet-Lite0 MBConv block, batch 32, on CPU.

  python benchmarks/lite0_blocks.py [--repeats 9] [--retain-freed-memory]

Each of the 16 blocks alone (BN in train mode, gradients of sum(y^2) w.r.t. params and
input, compiled with `xla_cpu.jit` like the training step) at its 224-px input size.
Prints the lower-quartile time per block and their sum: a finer, less noisy view of
the CPU rewrites (depthwise VJP, BN VJP) than the whole step of benchmarks/inference.py.
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# benchmarks/inference.py, imported first: its top applies --retain-freed-memory before
# jax starts any thread.
importlib.import_module("inference")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fgjax.models import efficientnet_lite, xla_cpu  # noqa: E402

# Input side of each block's input channel count in Lite0 at 224 px.
_INPUT_SIDE = {32: 112, 16: 112, 24: 56, 40: 28, 80: 14, 112: 14, 192: 7}


def time_block(args, repeats: int, batch: int = 32) -> float:
  side = _INPUT_SIDE[args.cin]
  block = efficientnet_lite.MBConv(args)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, side, side, args.cin)),
                  jnp.float32)
  variables = block.init(jax.random.PRNGKey(0), x[:1])

  @xla_cpu.jit
  def step(variables, x):
    def loss(params, x):
      y, upd = block.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(y * y), upd
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

  jax.block_until_ready(step(variables, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(variables, x))
    times.append(time.perf_counter() - t0)
  return sorted(times)[repeats // 4] * 1e3


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--retain-freed-memory", action="store_true",
                      help="glibc malloc keeps freed blocks (applied at import time)")
  args = parser.parse_args()
  ms = [time_block(a, args.repeats) for a in efficientnet_lite.block_args()]
  print(f"total {sum(ms):.0f} ms |", " ".join(f"{i}:{t:.0f}" for i, t in enumerate(ms)))


if __name__ == "__main__":
  main()
