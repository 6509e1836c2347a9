"""CUB-200-2011 (TFDS caltech_birds2011, bbox crop), SqueezeNet 1.1, scheme 'loose'.

The paper's Birds setting (Table 1, SqueezeNet column). Needs the prepared TFDS data:
  python launch.py --config=configs/birds_loose.py --workdir=workdirs/birds_loose \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Result: not run here (no network to fetch CUB; the offline error is tested).
"""

from configs import common


def get_config():
  return common.cub("loose")
