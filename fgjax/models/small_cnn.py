"""A tiny from-scratch CNN for small images (the offline digits demo, 8x8 .. 32x32).

Three conv3x3-BN-ReLU stages (32, 64, 128 channels), 2x2 max-pooling between them while
the feature map is larger than 4 pixels, then global average pooling to 128 features.
No pretrained weights; the deterministic init is the only initialisation.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models import layers

WIDTHS = (32, 64, 128)
FEATURE_DIM = WIDTHS[-1]
INPUT_SIZE = 32
# Inputs are expected in 0..1-scaled pixel units mapped to roughly zero mean.
MEAN = (127.5, 127.5, 127.5)
STD = (127.5, 127.5, 127.5)
STAGE_NAMES = tuple(f"stage{i}" for i in range(len(WIDTHS)))


class SmallCNN(nn.Module):
  """(N, H, W, 3) with 8 <= H, W -> (N, 128) pooled features (or (N, 1000) logits)."""
  include_top: bool = False
  num_classes: int = 1000
  fold_bn: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers.check_images(x, "SmallCNN", min_side=4)
    for i, width in enumerate(WIDTHS):
      x = nn.relu(layers.ConvBN(width, 3, 1, 1, folded=self.fold_bn,
                                conv_impl=self.conv_impl, dtype=self.dtype,
                                name=f"stage{i}")(x, train))
      if i < len(WIDTHS) - 1 and min(x.shape[1:3]) > 4:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = layers.global_avg_pool(x)
    if self.include_top:
      x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x
