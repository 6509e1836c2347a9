"""birds525 (525 species), Coarse2Fine (Eshratifar et al.; net 'c2f') on
EfficientNet-Lite0: the recipe of configs/cars196_c2f.py (8 orthogonally initialised
attention maps, coarse and fine BAP heads joined by the pre-trained up-sampler,
L = CE(coarse) + CE(fine) + 1.0 L_attention, averaged predictions), frozen backbone,
Adam at 1e-3 (chosen on val by the average's top-1, BENCHMARKS 17), cosine-decayed
(a constant rate makes BAP heads on augmented inputs collapse, BENCHMARKS 17).

Run:
  python launch.py --config=configs/birds525_c2f.py --workdir=workdirs/birds525_c2f

Result (BENCHMARKS 17, benchmarks/attention_table.py --dataset=birds525 --rows=c2f
--schedule=cosine --lrs=1e-3, this config at its defaults, 2026-12-07): test top-1
average .798, coarse .777, fine .752 (val .781 / .764 / .730). The average beats the
fine head (32 / 8, p = .0002) and leads the coarse head (24 / 13, p = .099); it is
level with GAP (.796, 31 / 30, p = 1), BAP + center loss (.787, p = .51) and crop-drop
(.787, p = .54), each at its own rate. At 3e-4 (the earlier default)
the average was val .743, test .775. About 4 backbone passes a step: 0.30-0.42 step/s
on the 2-core CPU, 1,470 steps.
"""

from configs import cars196_c2f


def get_config():
  return cars196_c2f.coarse2fine("birds525", learning_rate=1e-3)
