"""cars196, ELoPE's pooling and embedding loss under the impostor rule: loose impostors
(impostor paper eq. 4-6) on a global k-max pooled (K = 4) EfficientNet-Lite0, plus
2 L_e (ELoPE eq. 5-10) on the embedding, head-only on cached features.

ELoPE's parts act before the embedding (pooling) and on it (class means), the impostor
classifier after it: this config measures whether their gains add up (BENCHMARKS.md
section 11, rows 'fixed_gkmp_le' / 'loose_gkmp_le').

Run:
  python launch.py --config=configs/cars196_elope_loose.py \
      --workdir=workdirs/cars196_elope_loose
"""

from configs import common


def get_config():
  c = common.elope("cars196", learning_rate=1e-3)
  c.scheme = "loose"
  c.model.net = ""  # the scheme's: impostor
  return c
