"""birds525 (525 species, 3 train images each), EfficientNet-Lite0, scheme 'tied'.

Run:
  python launch.py --config=configs/birds525_tied.py --workdir=workdirs/birds525_tied

Result: see BENCHMARKS.md ("birds525: the five schemes"), where each run's command,
training depth and test accuracy are recorded.
"""

from configs import common


def get_config():
  return common.birds525("tied", learning_rate=3e-5, sigma=0.2)
