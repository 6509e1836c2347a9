"""birds525 (525 species, 3 training images each), ELoPE on EfficientNet-Lite0: global
k-max pooling (K = 4), a 512-d embedding layer and L = L_CE + 2 L_e (Hanselmann & Ney
2020, eq. 1-10, Table 2; tau 0.3 for birds), head-only on cached features of the frozen
ImageNet backbone.

Run:
  python launch.py --config=configs/birds525_elope.py --workdir=workdirs/birds525_elope

Result (2026-12-02, BENCHMARKS.md section 11, row gkmp_le; learning rate 1e-3 chosen
on val from 1e-4..3e-3): val top-1 0.712, test top-1 0.735, test top-5 0.897.
With the last block trainable as well (--config.model.trainable=last:1, on cached
outputs of the blocks before it; 1e-3 chosen again): val 0.726, test 0.754, test top-5
0.926 (2026-12-07, section 11 "At a deeper depth: last:1 on birds525").
Two blocks trainable (last:2, --config.optim.learning_rate=3e-4, chosen on val) gave
val 0.720, test 0.733: lower, like every row at that depth (section 11 "Deeper still").

The localization module and weighted k-max stages: README "ELoPE" and
benchmarks/elope_ablation.py. The module's boxes keep the whole image for 95.4% of the
test images (96.8% at last:1), so its crops change little (section 11).
"""

from configs import common


def get_config():
  return common.elope("birds525", learning_rate=1e-3)
