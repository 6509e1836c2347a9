"""birds525 (525 species, 3 train images each), EfficientNet-Lite0, scheme 'ce'.

Run:
  python launch.py --config=configs/birds525_ce.py --workdir=workdirs/birds525_ce

Result: see BENCHMARKS.md ("birds525: the five schemes"), where each run's command,
training depth and test accuracy are recorded.
"""

from configs import common


def get_config():
  return common.birds525("ce", learning_rate=3e-4)
