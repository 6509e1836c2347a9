"""Offline demo: loose impostors on scikit-learn's bundled handwritten digits.

Real data that installs with scikit-learn (1,797 8x8 images, 10 classes), a small CNN
trained from scratch; about a minute on 2 CPU cores.

Run:
  python launch.py --config=configs/digits_loose.py --workdir=workdirs/digits_loose

Result (2026-11-24, 2-core CPU VM): test top-1 0.989, val 0.997 (RBF rule, sigma 0.5
chosen on val), 12 s wall including compilation (BENCHMARKS.md, section 9).
"""

from configs import common


def get_config():
  c = common.get_config()
  c.scheme = "loose"
  c.data.source = "digits"
  c.data.split = "train:0.6,val:0.2,test:0.2"
  c.model.backbone = "small_cnn"
  c.model.pretrained = False
  c.model.embed_dim = 64
  c.input.image_size = 8
  c.input.resize_size = 8
  c.input.flip = False  # a mirrored digit is another glyph
  c.train.batch_size = 64
  c.train.num_epochs = 15
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  c.optim.learning_rate = 3e-3
  c.loss.nca.sigma = 0.3
  c.eval.batch_size = 128
  c.eval.sigma_grid = (0.1, 0.2, 0.3, 0.5)
  return c
