"""SqueezeNet 1.1 (Iandola et al. 2016), the torchvision architecture.

The impostor-networks paper (section 4) uses SqueezeNet as its "lightweight" backbone.
torchvision's `squeezenet1_1`: conv3x3/2 (64) - maxpool3/2 (ceil) - Fire x2 - maxpool -
Fire x2 - maxpool - Fire x4 (no BatchNorm), then the classifier dropout(0.5) - conv1x1
(1000) - ReLU - global average pool. Features are the globally pooled 512 channels of
the last Fire module.
"""

import re
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models import layers
from fgjax.models import pooling
from fgjax.models import segments

FEATURE_DIM = 512
DROPOUT = 0.5
WEIGHTS_FILE = "squeezenet1_1-b8a52dc0.pth"

# torchvision `features` index -> (squeeze, expand1x1, expand3x3) widths.
_FIRES = {3: (16, 64, 64), 4: (16, 64, 64), 6: (32, 128, 128), 7: (32, 128, 128),
          9: (48, 192, 192), 10: (48, 192, 192), 11: (64, 256, 256), 12: (64, 256, 256)}
# Top-level parameter groups in forward order (the unit of `trainable=last:N`).
BLOCKS = ("conv1",) + tuple(f"fire{i}" for i in _FIRES)


class Fire(nn.Module):
  """squeeze 1x1 + ReLU, then concat(ReLU(expand 1x1), ReLU(expand 3x3, pad 1))."""
  squeeze: int
  expand1x1: int
  expand3x3: int
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, p, name: layers.Conv2D(  # noqa: E731
        f, k, 1, p, use_bias=True, conv_impl=self.conv_impl, dtype=self.dtype,
        name=name)
    x = nn.relu(conv(self.squeeze, 1, 0, "squeeze")(x))
    return jnp.concatenate([nn.relu(conv(self.expand1x1, 1, 0, "expand1x1")(x)),
                            nn.relu(conv(self.expand3x3, 3, 1, "expand3x3")(x))], -1)


class SqueezeNet11(segments.Backbone):
  """SqueezeNet 1.1 with named outputs (fgjax.models.segments); H, W >= 32.

  Outputs: 'stem' (conv1 + ReLU + max pool, 64 channels, stride 4), 'stage1' (fire3-4,
  128), 'stage2' (max pool, fire6-7, 256, stride 8), 'stage3' (max pool, fire9-12,
  512, stride 16), 'map' (= stage3, the last conv map), 'pooled' (N, 512), and with
  include_top 'logits' (N, 1000: dropout, conv 1x1, ReLU, global average; the
  dropout needs a 'dropout' rng when train=True).

  `fold_bn` is accepted for a uniform interface (no BN here); `conv_impl`: see
  layers.Conv2D (it picks how the 1x1 convolutions run).
  """

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: Optional[str] = None,
               stop: Optional[str] = None) -> dict[str, jnp.ndarray]:
    if start is None:
      layers.check_images(x, "SqueezeNet11", min_side=32)

    def stem(y):
      return layers.ConvReluMaxPool(64, 3, 2, 0, pool_kernel=3, pool_stride=2,
                                    ceil_mode=True, conv_impl=self.conv_impl,
                                    dtype=self.dtype, name="conv1")(y)

    def fires(indices, pool_first):
      def fn(y):
        if pool_first:
          y = layers.max_pool_torch(y, 3, 2, ceil_mode=True, impl=self.conv_impl)
        for idx in indices:
          y = Fire(*_FIRES[idx], conv_impl=self.conv_impl, dtype=self.dtype,
                   name=f"fire{idx}")(y)
        return y
      return fn

    def logits(y):
      y = nn.Dropout(DROPOUT, deterministic=not train)(y)
      y = nn.relu(layers.Conv2D(1000, 1, 1, 0, use_bias=True, conv_impl=self.conv_impl,
                                dtype=self.dtype,
                                kernel_init=nn.initializers.normal(0.01),
                                name="classifier")(y))
      return pooling.global_avg_pool(y)

    segs = [("stem", stem), ("stage1", fires((3, 4), False)),
            ("stage2", fires((6, 7), True)), ("stage3", fires((9, 10, 11, 12), True)),
            ("map", lambda y: y), ("pooled", pooling.global_avg_pool)]
    out = segments.run_segments(segs, x, start, stop)
    # torchvision's classifier convolves the map, so it is not a segment after 'pooled'.
    if self.include_top and "pooled" in out and "map" in out:
      out["logits"] = logits(out["map"])
    return out


OUTPUTS = ("stem", "stage1", "stage2", "stage3", "map", "pooled")


def key_map(include_top: bool):
  """torchvision squeezenet1_1 module names -> flax module paths."""

  def fn(prefix: str) -> Optional[tuple[str, ...]]:
    if prefix == "features.0":
      return ("conv1",)
    m = re.fullmatch(r"features\.(\d+)\.(squeeze|expand1x1|expand3x3)", prefix)
    if m and int(m.group(1)) in _FIRES:
      return (f"fire{m.group(1)}", m.group(2))
    if prefix == "classifier.1":
      return ("classifier",) if include_top else None
    raise ValueError(f"unexpected SqueezeNet 1.1 weight '{prefix}'.")

  return fn
