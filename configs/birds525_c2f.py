"""birds525 (525 species), Coarse2Fine (Eshratifar et al.; net 'c2f') on
EfficientNet-Lite0: the recipe of configs/cars196_c2f.py (8 orthogonally initialised
attention maps, coarse and fine BAP heads joined by the pre-trained up-sampler,
L = CE(coarse) + CE(fine) + 1.0 L_attention, averaged predictions), frozen backbone,
Adam at 3e-4 (the learning rate configs/birds525_ce.py chose on val for the softmax
head; not tuned for Coarse2Fine), cosine-decayed (BENCHMARKS 17: a constant rate
makes BAP heads on augmented inputs collapse).

Run:
  python launch.py --config=configs/birds525_c2f.py --workdir=workdirs/birds525_c2f

Result (BENCHMARKS 17, benchmarks/attention_table.py --dataset=birds525 --rows=c2f
--schedule=cosine, this config at its defaults, 2026-12-06): test top-1 coarse .775,
fine .670, average .775 (val .747 / .653 / .743): the average is no better than the
coarse head, and level with BAP + center loss with 32 maps at its rate chosen on val
(3e-5: .787, 22 / 28, p = .48) and with GAP (.796 at 1e-2, p = .17). About
4 backbone passes a step: 0.30-0.37 step/s on the 2-core CPU, 1,470 steps.
"""

from configs import cars196_c2f


def get_config():
  return cars196_c2f.coarse2fine("birds525", learning_rate=3e-4)
