"""CPU time of Coarse2Fine's up-sampler: flax's transposed convolution against the
sub-pixel `Deconv2x` that replaced it (same parameters, same values), and the
pre-training loop (`pretrain_upsampler`, a lax.scan) with lax's convolution gradients
against `cpu_ops.conv_same`'s.

Both up-samplers map a batch of 7x7 maps to 224 x 224 (EfficientNet-Lite0 at 224 px:
five stride-2 stages, width 8), forward and forward + gradient of the pre-training L2
loss, timed interleaved call by call so the ratio compares like with like:

  python benchmarks/upsampler.py --batch=64 --rounds=5 --loop_steps=4 --loop_rounds=2
"""

import contextlib
import os
import sys
import time
from unittest import mock

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgjax.models import coarse2fine as c2f  # noqa: E402
from fgjax.models import cpu_ops  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 64, "Maps per call (pre-training uses 64).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 4, "Pre-training steps per loop timing "
                                   "(0: skip the loop timing).")
_LOOP_ROUNDS = flags.DEFINE_integer("loop_rounds", 2, "Interleaved loop timing rounds.")


def lax_conv_same(x, kernel):
  """cpu_ops.conv_same's values with lax's own gradients (the up-sampler before)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def time_loop(size):
  """Seconds per pre-training step inside pretrain_upsampler's lax.scan, both ways."""
  net = c2f.Upsampler(8)
  params = net.init(jax.random.key(1), jnp.zeros((1, 7, 7)), size)["params"]
  pairs = _BATCH.value * _LOOP_STEPS.value
  fns, losses = {}, {}
  for name, patch in (("lax gradients", mock.patch.object(cpu_ops, "conv_same", lax_conv_same)),
                      ("cpu_ops.conv_same", contextlib.nullcontext())):
    with patch:
      fns[name] = jax.jit(lambda p, k: c2f.pretrain_upsampler(
          net, p, k, (7, 7), size, pairs, 1, _BATCH.value)).lower(
              params, jax.random.key(2)).compile()
    losses[name] = float(fns[name](params, jax.random.key(2))[1][0])
  times = {name: [] for name in fns}
  for _ in range(_LOOP_ROUNDS.value):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(params, jax.random.key(2)))
      times[name].append((time.perf_counter() - t) / _LOOP_STEPS.value)
  print(f"\npre-training in its lax.scan, {_LOOP_STEPS.value} steps of batch "
        f"{_BATCH.value}, median of {_LOOP_ROUNDS.value} interleaved rounds; epoch losses "
        + ", ".join(f"{v:.6f}" for v in losses.values()))
  print("| convolution gradients | s per pre-training step |\n|---|---|")
  for name, t in times.items():
    print(f"| {name} | {np.median(t):.3f} |")


class TransposedUpsampler(c2f.Upsampler):
  """The up-sampler as it was: nn.ConvTranspose stages (the same parameter tree)."""

  @nn.compact
  def __call__(self, maps, size):
    y = maps[..., None]
    stages = int(np.ceil(np.log2(size[0] / maps.shape[1])))
    for i in range(stages):
      y = nn.relu(nn.ConvTranspose(self.width, (4, 4), strides=(2, 2), padding="SAME",
                                   name=f"deconv{i}")(y))
    return nn.Conv(1, (3, 3), padding="SAME", name="out")(y)[..., 0]


def main(argv):
  del argv
  size = (224, 224)
  low, high = c2f.synthetic_pairs(jax.random.key(0), jnp.arange(_BATCH.value), (7, 7),
                                  size)
  params = c2f.Upsampler(8).init(jax.random.key(1), low[:1], size)["params"]
  fns = {}
  for name, net in (("nn.ConvTranspose", TransposedUpsampler(8)),
                    ("Deconv2x", c2f.Upsampler(8))):
    loss = lambda p, net=net: jnp.mean((net.apply({"params": p}, low, size) - high) ** 2)  # noqa: E731
    fns[name] = (jax.jit(lambda p, net=net: net.apply({"params": p}, low, size)),
                 jax.jit(jax.value_and_grad(loss)))
  want = fns["nn.ConvTranspose"][1](params)
  got = fns["Deconv2x"][1](params)
  diff = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(want), jax.tree.leaves(got)))
  for fwd, _ in fns.values():  # compiled before timing, as the gradients above
    jax.block_until_ready(fwd(params))
  times = {name: ([], []) for name in fns}
  for _ in range(_ROUNDS.value):
    for name, (fwd, grad) in fns.items():
      for f, out in ((fwd, times[name][0]), (grad, times[name][1])):
        t = time.perf_counter()
        jax.block_until_ready(f(params))
        out.append(time.perf_counter() - t)
  print(f"batch {_BATCH.value}, 7x7 -> 224x224, width 8, {jax.devices()[0].device_kind}, "
        f"median of {_ROUNDS.value} interleaved rounds; loss+grad max |diff| {diff:.1e}")
  print("| up-sampler | forward s | forward + gradient s |\n|---|---|---|")
  for name, (f, g) in times.items():
    print(f"| {name} | {np.median(f):.3f} | {np.median(g):.3f} |")
  if _LOOP_STEPS.value:
    time_loop(size)


if __name__ == "__main__":
  app.run(main)
