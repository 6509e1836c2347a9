"""cars196 (196 car models, ~25 training images each, cropped to the car), ELoPE on
EfficientNet-Lite0: global k-max pooling (K = 4), a 512-d embedding layer and
L = L_CE + 2 L_e (Hanselmann & Ney 2020, eq. 1-10, Table 2), head-only on cached
features of the frozen ImageNet backbone.

Run:
  python launch.py --config=configs/cars196_elope.py --workdir=workdirs/cars196_elope

Result (2026-12-02, BENCHMARKS.md section 11, row gkmp_le; learning rate 3e-4 chosen
on val from 1e-4..3e-3): val top-1 0.632, test top-1 0.627, test top-5 0.878.
With the last block trainable as well (--config.model.trainable=last:1, on cached
outputs of the blocks before it; 3e-4 chosen again): val 0.696, test 0.716, test top-5
0.920 (2026-12-07, section 11 "At a deeper depth"). With two blocks trainable
(--config.model.trainable=last:2; 3e-4 chosen again): val 0.765, test 0.782, test
top-5 0.944 (2026-12-07, section 11 "Deeper still: last:2 on cars196").

The localization module and weighted k-max pooling are later stages of the same recipe
(config.init_from, README "ELoPE"; benchmarks/elope_ablation.py runs them all). On
cars196, already cropped to the car, the module's boxes keep the whole image for 98.6%
of the test images (99.1% at last:1), so the crops change nothing (section 11).
"""

from configs import common


def get_config():
  return common.elope("cars196", learning_rate=3e-4)
