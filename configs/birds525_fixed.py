"""birds525 (525 species, 3 train images each), EfficientNet-Lite0, scheme 'fixed'.

Run:
  python launch.py --config=configs/birds525_fixed.py --workdir=workdirs/birds525_fixed

Result: see BENCHMARKS.md ("birds525: the five schemes"), where each run's command,
training depth and test accuracy are recorded.
"""

from configs import common


def get_config():
  return common.birds525("fixed", learning_rate=1e-5, sigma=0.2)
