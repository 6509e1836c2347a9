"""The continual-learning protocol (NNGK review Algorithm 1, fgjax.continual) on digits.

A real train.Run on four digit classes, two tasks, head-only on the frozen (randomly
initialised) small CNN's features so that it runs in seconds: task splits, the three
methods end to end with resume, eq. (13) bookkeeping, and the forgetting baseline.
"""
import os

import numpy as np
import pytest

from configs import digits_continual
from fgjax import continual
from fgjax import train


def _config(**continual_fields):
  c = digits_continual.get_config()
  c.data.classes_subset = (0, 1, 2, 3)
  c.model.trainable = "head"
  c.train.cache_features = True
  c.train.batch_size = 32
  c.eval.sigma_grid = (0.3, 1.0)
  c.continual.update(dict(tasks=2, train_epochs=3, finetune_epochs=2, num_drop=10,
                          num_add=4, neighbours=8, softmax_learning_rate=1e-2))
  c.continual.update(continual_fields)
  return c


@pytest.fixture(scope="module")
def run():
  return train.Run(_config())


def test_task_splits_are_disjoint_complete_and_equal():
  groups = continual.task_classes(196, 4)
  assert [len(g) for g in groups] == [49] * 4
  np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(196))
  np.testing.assert_array_equal(continual.task_classes(10, 5)[1], [2, 3])
  with pytest.raises(ValueError, match="config.continual.tasks"):
    continual.task_classes(10, 3)


def test_task_data_holds_only_its_classes(run):
  splits = continual.load_splits(run)
  groups = continual.task_classes(run.num_classes, 2)
  tasks = [splits["train"].of_classes(g) for g in groups]
  assert set(tasks[0].labels) == {0, 1} and set(tasks[1].labels) == {2, 3}
  assert len(tasks[0].labels) + len(tasks[1].labels) == len(splits["train"].labels)
  assert not set(tasks[0].ids) & set(tasks[1].ids)
  assert tasks[0].inputs["pooled"].shape == (len(tasks[0].labels), 128)


def test_add_drop_bookkeeping(run):
  config = _config()
  learner = continual.METHODS["add_drop"](run, config, run.num_classes, 3e-3)
  task = continual.load_splits(run)["train"].of_classes([0, 1])
  learner.start_task(task)
  assert len(learner.centers) == len(task.labels)
  learner.train(task, 2, (0, 0, 0))
  info = learner.after_train(task)
  assert info["dropped"] == 10 and info["added"] == 4
  assert len(learner.centers) == len(task.labels) - 10 + 4
  assert len(learner.probs) == len(learner.owners) == len(learner.attached) == len(
      learner.centers)
  assert np.all(learner.probs >= 0)
  np.testing.assert_allclose(learner.probs.sum(1), 1.0, atol=1e-6)
  assert np.all(learner.probs[:, 2:] == 0)           # no mass on unseen classes
  # Added centers belong to task images and are not attached (eq. 6 keeps one each).
  assert set(learner.owners[-4:]) <= set(task.ids) and not learner.attached[-4:].any()
  # Added: the worst-predicted images, at least as bad as the mean of what was dropped.
  assert info["added_mean_posterior"] <= info["dropped_mean_posterior"]


def test_protocol_runs_resumes_and_softmax_forgets(run, tmp_path):
  config = _config()
  # 'loose' is 'add_drop' without after_train's add/drop: covered by the two.
  rows = {m: continual.run_protocol(run, config, m, str(tmp_path), log=lambda s: None)
          for m in ("softmax", "add_drop")}
  for method, rs in rows.items():
    assert [r["task"] for r in rs] == [0, 1]
    assert len(rs[1]["test_top1_per_task"]) == 2
    assert os.path.exists(tmp_path / method / "state1.msgpack")
  # Each task's images join the centers, then each add/drop nets n_a - n_d.
  n0, n1 = (r["train_images"] for r in rows["add_drop"])
  assert [r["num_centers"] for r in rows["add_drop"]] == [n0 - 6, n0 + n1 - 12]
  # Softmax: a C-way head trained on {2, 3} only must stop predicting {0, 1}.
  soft = rows["softmax"]
  assert soft[0]["test_top1"] > 0.75
  assert soft[1]["test_top1_per_task"][0] < 0.1
  assert soft[1]["forgetting"] > 0.65
  # Resume after a kill during task 1: task 0 is read back (its state, Adam's moments
  # included, restored), only task 1 trains again, and ends where it ended before.
  os.remove(tmp_path / "add_drop" / "task1.json")
  calls = []
  learner_train = continual.Learner.train
  try:
    continual.Learner.train = lambda self, *a: calls.append(a[2]) or learner_train(
        self, *a)
    again = continual.run_protocol(run, config, "add_drop", str(tmp_path),
                                   log=lambda s: None)
  finally:
    continual.Learner.train = learner_train
  assert [seed[1] for seed in calls] == [1, 1]
  assert again[0] == rows["add_drop"][0]
  for key in ("test_top1", "test_top1_per_task", "num_centers", "loss_finetune"):
    assert again[1][key] == rows["add_drop"][1][key]


def test_forgetting_definition():
  per_task = [[0.9], [0.5, 0.8], [0.6, 0.4, 0.7]]
  # Task 0: best 0.9, final 0.6 -> 0.3; task 1: best 0.8, final 0.4 -> 0.4.
  assert continual.forgetting(per_task) == pytest.approx(0.35)
  assert np.isnan(continual.forgetting([[0.9]]))
