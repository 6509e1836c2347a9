"""A tiny from-scratch CNN for small images (the offline digits demo, 8x8 .. 32x32).

Three conv3x3-BN-ReLU stages (32, 64, 128 channels), 2x2 max-pooling between them while
the feature map is larger than 4 pixels, then global average pooling to 128 features.
No pretrained weights; the deterministic init is the only initialisation.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models import layers
from fgjax.models import pooling
from fgjax.models import segments

WIDTHS = (32, 64, 128)
FEATURE_DIM = WIDTHS[-1]
INPUT_SIZE = 32
# Inputs are expected in 0..1-scaled pixel units mapped to roughly zero mean.
MEAN = (127.5, 127.5, 127.5)
STD = (127.5, 127.5, 127.5)
# Top-level parameter groups in forward order (the unit of `trainable=last:N`).
BLOCKS = tuple(f"stage{i}" for i in range(len(WIDTHS)))


class SmallCNN(segments.Backbone):
  """(N, H, W, 3), 4 <= H, W, with named outputs (fgjax.models.segments).

  Outputs: 'stem' (parameter group 'stage0', 32 channels), 'stage1' (64), 'stage2'
  (128), each conv3x3-BN-ReLU followed by a 2x2 max pool while the map is larger than
  4 pixels (not after the last); 'map' (= stage2), 'pooled' (N, 128), and with
  include_top 'logits' (N, num_classes).
  """
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: Optional[str] = None,
               stop: Optional[str] = None) -> dict[str, jnp.ndarray]:
    if start is None:
      layers.check_images(x, "SmallCNN", min_side=4)

    def conv(i):
      def fn(y):
        y = nn.relu(layers.ConvBN(WIDTHS[i], 3, 1, 1, folded=self.fold_bn,
                                  conv_impl=self.conv_impl, dtype=self.dtype,
                                  name=f"stage{i}")(y, train))
        if i < len(WIDTHS) - 1 and min(y.shape[1:3]) > 4:
          y = nn.max_pool(y, (2, 2), (2, 2))
        return y
      return fn

    segs = [("stem", conv(0)), ("stage1", conv(1)), ("stage2", conv(2)),
            ("map", lambda y: y), ("pooled", pooling.global_avg_pool)]
    if self.include_top:
      segs.append(("logits", nn.Dense(self.num_classes, dtype=self.dtype,
                                      name="classifier")))
    return segments.run_segments(segs, x, start, stop)


OUTPUTS = ("stem", "stage1", "stage2", "map", "pooled")
