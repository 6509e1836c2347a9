"""cars196 (196 car models, ~25 training images each, cropped to the car), ELoPE on
EfficientNet-Lite0: global k-max pooling (K = 4), a 512-d embedding layer and
L = L_CE + 2 L_e (Hanselmann & Ney 2020, eq. 1-10, Table 2), head-only on cached
features of the frozen ImageNet backbone.

Run:
  python launch.py --config=configs/cars196_elope.py --workdir=workdirs/cars196_elope

The localization module and weighted k-max pooling are later stages of the same recipe
(config.init_from; benchmarks/elope_ablation.py runs them all). Result: see the
ablation in BENCHMARKS.md section 11 (learning rate chosen on val there).
"""

from configs import common


def get_config():
  return common.elope("cars196", learning_rate=1e-3)
