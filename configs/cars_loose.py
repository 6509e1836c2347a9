"""Stanford Cars (TFDS cars196, bbox crop), SqueezeNet 1.1, loose impostors.

The paper's Cars setting (Table 1: loose 85.05 vs ConvNet 78.65). Needs prepared TFDS:
  python launch.py --config=configs/cars_loose.py --workdir=workdirs/cars_loose \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Result: not run here (no network to fetch cars196; the offline error is tested).
"""

from configs import common


def get_config():
  c = common.cub("loose")
  c.data.tfds_name = "cars196"
  return c
