"""Offline demo of sequential early exit on scikit-learn's digits (small CNN).

The digits demo (configs/digits_loose.py), then exit heads on the backbone's 'stage1',
'stage2' and 'map' (linear SVMs, the paper's default), thresholds by the
Benjamini-Hochberg rule at alpha 0.1 (Savchenko 2021; fgjax/early_exit).

Run:
  python launch.py --config=configs/digits_early_exit.py --workdir=workdirs/digits_ee
  python -m fgjax.predict --workdir=workdirs/digits_ee --early_exit image.png

Result (2026-12-02, 2-core CPU VM; BENCHMARKS.md section 14): the network's own RBF
rule test top-1 0.989; the SVM exits alone 0.972 (stage1), 0.986 (stage2), 0.986
(map); sequential at alpha 0.1 (adaptive) 0.978 on test with 98.6% of the images
answered at stage1 and 1.4% at stage2.
"""

from configs import digits_loose


def get_config():
  c = digits_loose.get_config()
  c.early_exit.exits = ("stage1", "stage2", "map")
  c.early_exit.head = "svm"
  return c
