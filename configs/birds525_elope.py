"""birds525 (525 species, 3 training images each), ELoPE on EfficientNet-Lite0: global
k-max pooling (K = 4), a 512-d embedding layer and L = L_CE + 2 L_e (Hanselmann & Ney
2020, eq. 1-10, Table 2; tau 0.3 for birds), head-only on cached features of the frozen
ImageNet backbone.

Run:
  python launch.py --config=configs/birds525_elope.py --workdir=workdirs/birds525_elope

Result: see the ablation in BENCHMARKS.md section 11 (learning rate chosen on val
there; the localization module and weighted k-max stages: benchmarks/elope_ablation.py).
"""

from configs import common


def get_config():
  return common.elope("birds525", learning_rate=1e-3)
