"""Continual learning with impostors (NNGK review, Algorithm 1) on scikit-learn digits.

Class-incremental: 5 tasks of 2 digits each (classes 0-1, 2-3, ...), a small CNN from
scratch, per task 20 epochs (n_t), then add/drop, then 10 more (n_f). Three methods
(fgjax/continual.py): 'softmax' (cross-entropy fine-tuning, the forgetting baseline),
'loose' (loose impostors, each task's images joining the centers, no add/drop) and
'add_drop' (loose + Algorithm 1: drop the 50 best-predicted centers, add the 20
worst-predicted task images, eq. 13 redistributing neighbour labels, k = 32). Not a
launch.py config (launch.py would train plain loose impostors on all classes):

Run:
  python benchmarks/continual.py --config=configs/digits_continual.py \
      --workdir=workdirs/digits_continual

Result (2026-12-06, 2-core CPU VM, ~15 s per method): every method forgets every old
task completely. Seen-class test top-1 after tasks 1-5: softmax 1.000 / .500 / .332 /
.252 / .193, loose 1.000 / .507 / .336 / .329 / .193, add_drop 1.000 / .542 / .336 /
.322 / .193 (add only, --config.continual.num_drop=0: .308 after task 4); .193 is the
last task alone (BENCHMARKS.md, "Continual learning with impostors (issue 17)").
"""

from configs import digits_loose


def get_config():
  c = digits_loose.get_config()
  c.continual = dict(
      tasks=5,              # contiguous groups of equal size, in class order
      train_epochs=20,      # n_t
      finetune_epochs=10,   # n_f
      num_drop=50,          # n_d per task (never a class's last center)
      num_add=20,           # n_a per task
      neighbours=32,        # k of eq. (13)
      softmax_learning_rate=3e-3,
      methods=("softmax", "loose", "add_drop"))
  return c
