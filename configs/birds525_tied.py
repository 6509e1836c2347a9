"""birds525 (525 species, 3 train images each), EfficientNet-Lite0, tied impostors.

Head-only training on cached backbone features (the ImageNet backbone stays frozen), 30
epochs, Adam, learning rate 3e-5, training sigma 0.2: chosen on the validation split
(BENCHMARKS.md, section 5).

Run:
  python launch.py --config=configs/birds525_tied.py --workdir=workdirs/birds525_tied

Result (2026-11-24, 2-core CPU VM, top-1, RBF rule, sigma 0.5 chosen on val): val 0.716,
test 0.724 (top-5 0.899). Deeper fine-tuning: add --config.model.trainable=last:3
--config.train.cache_features=False (BENCHMARKS.md has that row too).
"""

from configs import common


def get_config():
  return common.birds525("tied", learning_rate=3e-5, sigma=0.2)
