"""cars196, ELoPE's pooling and embedding loss under the impostor rule: loose impostors
(impostor paper eq. 4-6) on a global k-max pooled (K = 4) EfficientNet-Lite0, plus
2 L_e (ELoPE eq. 5-10) on the embedding, head-only on cached features.

ELoPE's parts act before the embedding (pooling) and on it (class means), the impostor
classifier after it: this config measures whether their gains add up (BENCHMARKS.md
section 11, rows 'fixed_gkmp_le' / 'loose_gkmp_le').

Run:
  python launch.py --config=configs/cars196_elope_loose.py \
      --workdir=workdirs/cars196_elope_loose

Result (2026-12-02, section 11 row loose_gkmp_le; learning rate 1e-4 chosen on val from
1e-5..3e-3): val top-1 0.614, test top-1 0.608, test top-5 0.862: below the softmax
head's 0.627 (configs/cars196_elope.py), so here the gains do not add up.
"""

from configs import common


def get_config():
  c = common.elope("cars196", learning_rate=1e-4)
  c.scheme = "loose"
  c.model.net = ""  # the scheme's: impostor
  return c
