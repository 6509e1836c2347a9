"""cars196 (196 car models), Coarse2Fine (Eshratifar et al.; net 'c2f',
fgjax/models/coarse2fine.py) on EfficientNet-Lite0: 8 attention maps with the
orthogonal init (Algorithm 1), a coarse BAP head, the pre-trained deconvolutional
up-sampler masking the image with one attention map, and the fine BAP head on the
masked image through the same backbone. L = CE(coarse) + CE(fine) + 1.0 L_attention
(eq. 4; the attention center loss on the coarse and fine part features, Algorithm 1
line 12); 'logits' averages the two predicted distributions (c2f_mode='average', the
paper's best).

Scaled to a CPU budget: the ImageNet backbone stays frozen (trainable='head', not the
paper's full fine-tuning of InceptionV3 for 200 epochs with SGD), Adam at 1e-3 (chosen
on val over 3e-4 and 3e-3) decayed by a cosine schedule (a constant rate makes BAP
heads on augmented inputs collapse, BENCHMARKS 17), and the up-sampler pre-trains on
4,096 synthetic pairs for 5 epochs (the paper: 60,000 pairs, 100 epochs). The fine
pass runs the backbone on the masked image every step, so no feature caching. With an
accelerator: --config.model.trainable=all --config.model.upsampler_pretrain_pairs=60000
--config.model.upsampler_pretrain_epochs=100.

Run (10 epochs, 1,520 steps; about an hour alone on the 2-core CPU, 88 minutes
with the test suite beside it for 20 of them):
  python launch.py --config=configs/cars196_c2f.py --workdir=workdirs/cars196_c2f \
      --config.eval.extra_logits='("coarse_logits","fine_logits")'

Result (BENCHMARKS 17, 2026-12-07, run by benchmarks/attention_table.py with this
recipe at --epochs=10): test top-1 average .704 +- .009, coarse .671, fine .669
(val .700 / .663 / .666). The average beats both heads (p = 2e-8 and 7e-10), as the
paper finds, and bap + center on the same inputs by 3.4 points (.670, p = 4e-6). At
3e-4 it scored .683 (val .687); at 3e-3 val .657. About 4 backbone passes a step:
0.4-0.45 step/s alone on the 2-core CPU.
"""

from configs import common


def coarse2fine(dataset: str, learning_rate: float):
  """The Coarse2Fine recipe above on a folder data set."""
  c = common.folder_schemes(dataset, "ce", learning_rate)
  c.model.net = "c2f"
  c.model.attention_maps = 8
  c.model.attention_orthogonal_init = True
  c.model.c2f_mode = "average"
  c.model.upsampler_pretrain_pairs = 4096
  c.model.upsampler_pretrain_epochs = 5
  # At a constant Adam rate a BAP head on augmented (uncached) inputs memorises the
  # training set and then falls apart (BENCHMARKS 17); WS-DAN decays its rate too.
  c.optim.schedule = "cosine"
  c.train.cache_features = False
  c.loss.terms = "ce,ce_fine,attention_center"
  c.loss.ce.input = "coarse_logits"
  c.loss.attention_center.fine_input = "fine_part_features"
  return c


def get_config():
  c = coarse2fine("cars196", learning_rate=1e-3)
  # 1,520 steps, about birds525's 30 epochs; 30 cars196 epochs take 4-5 h on 2 cores.
  c.train.num_epochs = 10
  return c
