"""birds525 (525 species, 3 train images each), EfficientNet-Lite0, ConvNet-extra (cross-
entropy, extra d_em layer).

Head-only training on cached backbone features (the ImageNet backbone stays frozen), 30
epochs, Adam, learning rate 3e-4: chosen on the validation split (BENCHMARKS.md, section
5).

Run:
  python launch.py --config=configs/birds525_ce_extra.py --workdir=workdirs/birds525_ce_extra

Result (2026-11-24, 2-core CPU VM, top-1, softmax head): val 0.712, test 0.735 (top-5
0.909). Deeper fine-tuning: add --config.model.trainable=last:3
--config.train.cache_features=False (BENCHMARKS.md has that row too).
"""

from configs import common


def get_config():
  return common.birds525("ce_extra", learning_rate=3e-4)
