"""cars196, sequential early exit on EfficientNet-Lite0 (Savchenko 2021).

The ConvNet baseline trained head-only on the frozen ImageNet backbone (learning rate
1e-3, chosen on val, BENCHMARKS.md section 13), then exit heads after 'stage4',
'stage6' and the last conv map 'map' (two intermediate layers plus the penultimate
one, as the paper does): global average pooling, l2-normalisation, a linear SVM
(squared hinge), thresholds by eq. (4) with the Benjamini-Hochberg alpha_m = alpha m / M
at alpha 0.1, fitted on half of each class's training images.

Run:
  python launch.py --config=configs/cars196_early_exit.py --workdir=workdirs/cars196_ee
  python -m fgjax.predict --workdir=workdirs/cars196_ee --early_exit photos/

Result (2026-12-02, 2-core CPU VM; BENCHMARKS.md section 14): the network's softmax
test top-1 0.611; the SVM exits alone 0.247 (stage4), 0.553 (stage6), 0.628 (map);
sequential at alpha 0.1 (adaptive) 0.600 on test, answering 10.3% / 29.2% / 60.5% of
the images at stage4 / stage6 / map.
"""

from configs import common


def get_config():
  c = common.birds525("ce", learning_rate=1e-3)
  c.data.source = "cars196"
  c.early_exit.exits = ("stage4", "stage6", "map")
  c.early_exit.head = "svm"
  return c
