"""birds525: the impostor paper's RBF-SVM baseline (section 4) on frozen
EfficientNet-Lite0 features.

Trains nothing (config.train.num_epochs=0): scikit-learn's SVC(kernel='rbf') on the
l2-normalised pooled 1280-d features of the frozen ImageNet backbone (the ConvNet's last
hidden layer; cached like the head-only schemes' features, shared through
--config.train.feature_cache_dir), C and gamma chosen on val top-1 from
config.eval.rbf_svm_C_grid x rbf_svm_gamma_grid (fgjax/rbf_svm.py), test scored once.
The baseline is results.json['rbf_svm']; the run's 'splits' are its untrained softmax
classifier (chance level), not a result.

Run:
  python launch.py --config=configs/birds525_rbf_svm.py \
      --workdir=workdirs/birds525_rbf_svm

Result (2026-12-06, 2-core CPU VM, features cached): C 10, gamma 0.31 (0.25 x scale)
chosen on val (top-1 0.756); test top-1 0.760 +- 0.019, top-5 0.905; 6 minutes. Level
with the head-only ConvNet (0.764) and loose impostors (0.758), above fixed and tied
(0.724) (BENCHMARKS.md, "RBF-SVM on frozen features").
"""

from configs import common


def get_config():
  c = common.folder_schemes("birds525", "ce", learning_rate=1e-3)
  c.train.num_epochs = 0
  c.eval.rbf_svm = True
  c.export.int8_calibration_images = 0  # the exported network is untrained
  return c
