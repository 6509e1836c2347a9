"""cars196: the impostor paper's RBF-SVM baseline (section 4) on frozen
EfficientNet-Lite0 features.

Trains nothing (config.train.num_epochs=0): scikit-learn's SVC(kernel='rbf') on the
l2-normalised pooled 1280-d features of the frozen ImageNet backbone (the ConvNet's last
hidden layer; cached like the head-only schemes' features, shared through
--config.train.feature_cache_dir), C and gamma chosen on val top-1 from
config.eval.rbf_svm_C_grid x rbf_svm_gamma_grid (fgjax/rbf_svm.py), test scored once.
The baseline is results.json['rbf_svm']; the run's 'splits' are its untrained softmax
classifier (chance level), not a result.

Run:
  python launch.py --config=configs/cars196_rbf_svm.py \
      --workdir=workdirs/cars196_rbf_svm

Result (2026-12-06, 2-core CPU VM, features cached): C 10, gamma 1.23 (1 x scale)
chosen on val (top-1 0.555); test top-1 0.575 +- 0.010, top-5 0.820; 10 minutes, nearly
all of it the 20 SVM fits. Below the head-only ConvNet (0.611) and loose impostors
(0.646), above fixed (0.542), level with tied (0.565) (BENCHMARKS.md, "RBF-SVM on
frozen features").
"""

from configs import common


def get_config():
  c = common.folder_schemes("cars196", "ce", learning_rate=1e-3)
  c.train.num_epochs = 0
  c.eval.rbf_svm = True
  c.export.int8_calibration_images = 0  # the exported network is untrained
  return c
