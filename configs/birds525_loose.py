"""birds525 (525 species, 3 train images each), EfficientNet-Lite0, loose impostors.

Head-only training on cached backbone features (the ImageNet backbone stays frozen), 30
epochs, Adam, learning rate 1e-4, training sigma 0.5: chosen on the validation split
(BENCHMARKS.md, section 5).

Run:
  python launch.py --config=configs/birds525_loose.py --workdir=workdirs/birds525_loose

Result (2026-11-24, 2-core CPU VM, top-1, RBF rule, sigma 0.5 chosen on val): val 0.745,
test 0.758 (top-5 0.909). Deeper fine-tuning: add --config.model.trainable=last:3
--config.train.cache_features=False (BENCHMARKS.md has that row too).
"""

from configs import common


def get_config():
  return common.birds525("loose", learning_rate=1e-4, sigma=0.5)
