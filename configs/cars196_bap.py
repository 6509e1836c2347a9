"""cars196 (196 car models), bilinear attention pooling (WS-DAN, Hu & Qi 2019) on
EfficientNet-Lite0: 32 attention maps (1x1 conv + BN + ReLU) on the last conv map,
BAP features (signed square root, l2-normalised, x 100) -> softmax classifier, trained
with cross-entropy plus the attention center loss (lambda 1, beta 5e-2; WS-DAN eq. 9,
Coarse2Fine eq. 2-3), head-only on cached features of the frozen ImageNet backbone
(the 2-core CPU setting of the other cars196 configs). Learning rate 3e-4, chosen on
val over 1e-3 and 1e-4 (BENCHMARKS 17: val .588 against .515 at 1e-4).

WS-DAN's attention cropping and dropping need the backbone on every step's images:
add --config.model.attention_crop_drop=True --config.train.cache_features=False
--config.loss.terms=ce,ce_crop,ce_drop,attention_center (WS-DAN weighs the three
cross-entropies 1/3 each: --config.loss.ce.weight=0.333 and the same for ce_crop,
ce_drop), and --config.optim.schedule=cosine: on augmented inputs a constant rate makes
the BAP head collapse (BENCHMARKS 17: birds525 .604 constant, .792 cosine).

Run:
  python launch.py --config=configs/cars196_bap.py --workdir=workdirs/cars196_bap

Result (BENCHMARKS.md section 17, row 'bap + center loss', 2026-12-02, reproduced
2026-12-06): val top-1 .588, test top-1 .610 +- .010 (the GAP ConvNet: .611); with
--config.model.attention_orthogonal_init=True: val .624, test .624 +- .010.
On these frozen features the center loss does not pay once plain BAP gets its own rate:
--config.loss.terms=ce --config.optim.learning_rate=1e-4 gave val .625, test .638 +-
.010, the best cars196 head-only row (BENCHMARKS 17, "Every row's learning rate").
"""

from configs import common


def get_config():
  c = common.folder_schemes("cars196", "ce", learning_rate=3e-4)
  c.model.net = "bap"
  c.model.attention_maps = 32
  c.loss.terms = "ce,attention_center"
  return c
