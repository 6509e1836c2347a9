"""cars196 (196 car models), loose impostors trained by k-NN NCA: each training image's
NCA term (impostor paper eq. 4) runs over its 64 nearest impostors only (Meyer et al.'s
k-NN RBF solver, NNGK review eq. 6-7; policy 'knn_loose', fgjax/impostor_policies.py),
the lists refreshed every 500 steps from the current embeddings (exact search).
EfficientNet-Lite0, head-only on cached features, the learning rate and training sigma
of the loose cars196 setting (3e-4, 0.5). For fixed impostors: --config.scheme=fixed
--config.impostors.policy=knn.

Run:
  python launch.py --config=configs/cars196_knn.py --workdir=workdirs/cars196_knn

Result (2026-12-06, 2-core CPU VM, commit 10ba013, features cached): val top-1 0.638,
test 0.648 +- 0.010 (top-5 0.872, test sigma 0.3 chosen on val), the same as loose
impostors over all 4,894 (test 0.646; McNemar 136 / 133, p = 0.90). Fixed impostors by
k-NN (--config.scheme=fixed --config.impostors.policy=knn
--config.optim.learning_rate=3e-5 --config.loss.nca.sigma=0.1): test 0.547 against 0.542
over all (p = 0.47). BENCHMARKS.md section 21 has the step time against M.
"""

from configs import common


def get_config():
  c = common.folder_schemes("cars196", "loose", learning_rate=3e-4, sigma=0.5)
  c.impostors.policy = "knn_loose"
  c.impostors.knn_k = 64
  return c
