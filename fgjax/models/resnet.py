"""ResNet-18 / ResNet-50 (He et al. 2016), the torchvision architectures (v1.5).

conv7x7/2 + BN + ReLU, maxpool3/2 (pad 1), four stages of BasicBlock (18) or Bottleneck
(50, stride on the 3x3 conv as in torchvision "v1.5"), a 1x1 conv + BN projection
shortcut where the shape changes, global average pooling and fc. BN eps 1e-5.
"""

import re
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models import layers
from fgjax.models import pooling
from fgjax.models import segments

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # torch momentum 0.1
DEPTHS = (18, 50)
_LAYOUT = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}
_BOTTLENECK = {18: False, 50: True}
WEIGHTS_FILES = {18: "resnet18-f37072fd.pth", 50: "resnet50-0676ba61.pth"}


def feature_dim(depth: int) -> int:
  return 2048 if _BOTTLENECK[depth] else 512


def blocks(depth: int) -> tuple[str, ...]:
  """Top-level parameter groups in forward order (the unit of `trainable=last:N`)."""
  return ("stem",) + tuple(f"layer{s + 1}_{b}" for s, n in enumerate(_LAYOUT[depth])
                           for b in range(n))


class Block(nn.Module):
  """BasicBlock (two 3x3) or Bottleneck (1x1, 3x3 with stride, 1x1 x4) + shortcut."""
  width: int
  stride: int
  bottleneck: bool
  fold_bn: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    unit = lambda f, k, s, p, name: layers.ConvBN(  # noqa: E731
        f, k, s, p, 1, BN_MOMENTUM, BN_EPSILON, self.fold_bn, self.conv_impl,
        self.dtype, name=name)
    if self.bottleneck:
      out_width = 4 * self.width
      y = nn.relu(unit(self.width, 1, 1, 0, "conv1")(x, train))
      y = nn.relu(unit(self.width, 3, self.stride, 1, "conv2")(y, train))
      y = unit(out_width, 1, 1, 0, "conv3")(y, train)
    else:
      out_width = self.width
      y = nn.relu(unit(self.width, 3, self.stride, 1, "conv1")(x, train))
      y = unit(self.width, 3, 1, 1, "conv2")(y, train)
    if self.stride != 1 or x.shape[-1] != out_width:
      x = unit(out_width, 1, self.stride, 0, "downsample")(x, train)
    return nn.relu(y + x)


class ResNet(segments.Backbone):
  """ResNet with named outputs (fgjax.models.segments).

  Outputs: 'stem' (conv7x7/2 + BN + ReLU + max pool, 64 channels, stride 4),
  'stage1'..'stage4' (torchvision's layer1..layer4, strides 4, 8, 16, 32), 'map'
  (= stage4), 'pooled' (N, 512 | 2048), and with include_top 'logits' (N, 1000).

  `conv_impl`: see layers.Conv2D (ResNet has no depthwise convs; it picks how the 1x1
  convolutions run).
  """
  depth: int = 18

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: Optional[str] = None,
               stop: Optional[str] = None) -> dict[str, jnp.ndarray]:
    if self.depth not in _LAYOUT:
      raise ValueError(f"ResNet depth={self.depth}: expected one of {DEPTHS}.")
    if start is None:
      layers.check_images(x, f"ResNet{self.depth}")

    def stem(y):
      y = nn.relu(layers.ConvBN(64, 7, 2, 3, 1, BN_MOMENTUM, BN_EPSILON, self.fold_bn,
                                self.conv_impl, self.dtype, name="stem")(y, train))
      return layers.max_pool_torch(y, 3, 2, padding=1, impl=self.conv_impl)

    def stage(s, n):
      def fn(y):
        for b in range(n):
          y = Block(64 * 2**s, 2 if (b == 0 and s > 0) else 1, _BOTTLENECK[self.depth],
                    self.fold_bn, self.conv_impl, self.dtype,
                    name=f"layer{s + 1}_{b}")(y, train)
        return y
      return fn

    segs = [("stem", stem)]
    segs += [(f"stage{s + 1}", stage(s, n)) for s, n in enumerate(_LAYOUT[self.depth])]
    segs += [("map", lambda y: y), ("pooled", pooling.global_avg_pool)]
    if self.include_top:
      segs.append(("logits", nn.Dense(1000, dtype=self.dtype, name="classifier")))
    return segments.run_segments(segs, x, start, stop)


OUTPUTS = ("stem", "stage1", "stage2", "stage3", "stage4", "map", "pooled")


def key_map(include_top: bool):
  """torchvision resnet module names -> flax module paths."""

  def fn(prefix: str) -> Optional[tuple[str, ...]]:
    if prefix in ("conv1", "bn1"):
      return ("stem", "conv" if prefix == "conv1" else "bn")
    if prefix == "fc":
      return ("classifier",) if include_top else None
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)", prefix)
    if m:
      return (f"layer{m.group(1)}_{m.group(2)}", f"conv{m.group(4)}",
              "conv" if m.group(3) == "conv" else "bn")
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])", prefix)
    if m:
      return (f"layer{m.group(1)}_{m.group(2)}", "downsample",
              "conv" if m.group(3) == "0" else "bn")
    raise ValueError(f"unexpected ResNet weight '{prefix}'.")

  return fn
