"""birds525 (525 species), Coarse2Fine (Eshratifar et al.; net 'c2f') on
EfficientNet-Lite0: the recipe of configs/cars196_c2f.py (8 orthogonally initialised
attention maps, coarse and fine BAP heads joined by the pre-trained up-sampler,
L = CE(coarse) + CE(fine) + 1.0 L_attention, averaged predictions), frozen backbone,
Adam at 3e-4 (the learning rate configs/birds525_ce.py chose on val for the softmax
head; not tuned for Coarse2Fine), cosine-decayed (BENCHMARKS 17: a constant rate
makes BAP heads on augmented inputs collapse).

Run:
  python launch.py --config=configs/birds525_c2f.py --workdir=workdirs/birds525_c2f

Result: not yet run (BENCHMARKS 17 says why: about 4 backbone passes per image and
step on a 2-core CPU).
"""

from configs import cars196_c2f


def get_config():
  return cars196_c2f.coarse2fine("birds525", learning_rate=3e-4)
