"""Continual learning with impostors (NNGK review, Algorithm 1) on cars196.

Class-incremental: 4 tasks of 49 car models (classes 0-48, 49-97, ...), EfficientNet-
Lite0 frozen, heads trained on its cached features, the loose cars196 setting
(learning rate 3e-4, training sigma 0.5; BENCHMARKS.md section 16), per task 20
epochs (n_t), add/drop, 10 more (n_f). Methods (fgjax/continual.py): 'softmax'
(cross-entropy fine-tuning at 1e-3, section 16's choice for ce), 'loose' (no
add/drop), 'add_drop' (drop the 300 best-predicted centers, add the 120
worst-predicted task images, eq. 13 over k = 32 neighbours). Not a launch.py config:

Run:
  python benchmarks/continual.py --config=configs/cars196_continual.py \
      --workdir=workdirs/cars196_continual --config.train.feature_cache_dir=/work/runs/fcache

Result (2026-12-06, 2-core CPU VM, 0.5-4 min per method; mean ± sd over seeds 0-2):
seen-class test top-1 after task 4 (joint training of all 196 classes: .646):
softmax .197 ± .000 (forgetting .690), loose .463 ± .010 (.239), add_drop .387 ± .004
(.372), add only (--config.continual.num_drop=0) .449 ± .010 (.273). The loose
impostor net forgets far less than softmax; Algorithm 1's drops remove mostly old
tasks' centers and hurt (BENCHMARKS.md, "Continual learning with impostors (issue 17)").
"""

from configs import common


def get_config():
  c = common.folder_schemes("cars196", "loose", learning_rate=3e-4, sigma=0.5)
  c.continual = dict(
      tasks=4,
      train_epochs=20,
      finetune_epochs=10,
      num_drop=300,
      num_add=120,
      neighbours=32,
      softmax_learning_rate=1e-3,
      methods=("softmax", "loose", "add_drop"))
  return c
