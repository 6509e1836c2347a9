"""CUB-200-2011 (TFDS caltech_birds2011), ELoPE as in the paper: ResNet-50 at 448 px,
global k-max pooling (K = 4), 512-d embedding layer, L = L_CE + 2 L_e, tau 0.3, the
whole network fine-tuned (Hanselmann & Ney 2020, sections 3-6, Table 2).

Needs prepared TFDS data and the torchvision ResNet-50 weights (no download here):
  python launch.py --config=configs/cub_elope.py --workdir=workdirs/cub_elope \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets \
      --config.model.weights_path=/path/to/resnet50-0676ba61.pth

Localization accuracy (ELoPE Table 4, IoU >= 0.5 with CUB's boxes) is evaluated on the
test split (config.eval.localization). Result: not run here (no TFDS data, no weights
and no accelerator on this machine; the offline errors are tested).
"""

from configs import common


def get_config():
  c = common.elope("tfds", learning_rate=3e-3)
  c.data.tfds_name = "caltech_birds2011"
  c.model.backbone = "resnet50"
  c.model.localizer_stop = "stage1"     # stem + first residual stage, ~220k params
  c.model.localizer_map_size = 14       # 448 / 32
  c.model.localizer_tau = 0.3
  c.model.trainable = "all"
  c.train.cache_features = False
  c.train.batch_size = 14               # the paper's batch size
  c.train.num_epochs = 90
  c.input.image_size, c.input.resize_size = 448, 512
  c.optim.schedule = "cosine"
  c.eval.batch_size = 14
  c.eval.localization = True
  return c
