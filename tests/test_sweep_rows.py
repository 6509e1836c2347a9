"""benchmarks/sweep_rows.py: the table scripts' rows, choice on val, paired test."""

import numpy as np
import pytest

from benchmarks import sweep_rows
from configs import common


def results(top1_val, top1_test, head="softmax", heads=None):
  cal = {head: {"ece": 0.1, "nll": 1.5}}
  if head == "softmax":
    cal["softmax_temperature"] = {"ece": 0.02, "nll": 1.2}
  test = {"num_examples": 400, head: {"top1": top1_test, "top5": 0.9}, "calibration": cal}
  val = {head: {"top1": top1_val}}
  if heads:
    test["heads"] = {k: {"top1": v, "top5": 0.8} for k, v in heads.items()}
    val["heads"] = {k: {"top1": v - 0.01} for k, v in heads.items()}
  return {"splits": {"val": val, "test": test}, "sigma": 0.5, "train_seconds": 12.0,
          "openset": {"ks": 0.3, "auroc": 0.7}}


def test_row_of_reads_the_runs_own_classifier_and_extra_heads():
  row = sweep_rows.row_of("ce", 1e-3, None, "/w", results(0.5, 0.6))
  assert row["classifier"] == "softmax" and row["test_top1"] == 0.6
  assert row["test_top1_se"] == pytest.approx(np.sqrt(0.6 * 0.4 / 400))
  assert (row["ece_temperature"], row["openset_auroc"], row["test_sigma"]) == (0.02, 0.7,
                                                                              None)
  rbf = sweep_rows.row_of("loose", 3e-4, 0.5, "/w", results(0.5, 0.7, head="rbf"))
  assert rbf["classifier"] == "rbf" and rbf["test_sigma"] == 0.5
  assert "ece_temperature" not in rbf
  extra = sweep_rows.row_of("c2f_fine", 3e-4, None, "/w",
                            results(0.5, 0.6, heads={"fine_logits": 0.55}),
                            head="fine_logits")
  # An extra head has its own accuracies, and no calibration or open set of its own.
  assert (extra["val_top1"], extra["test_top1"], extra["ece"]) == (0.54, 0.55, None)
  assert "openset_ks" not in extra


def test_choose_takes_the_best_val_and_the_first_on_ties():
  rows = [{"val_top1": 0.5, "i": 0}, {"val_top1": 0.7, "i": 1}, {"val_top1": 0.7, "i": 2}]
  assert sweep_rows.choose(rows)["i"] == 1


def test_paired_counts_discordant_images(tmp_path):
  labels = np.arange(10) % 3
  a = labels.copy()
  a[:2] = (labels[:2] + 1) % 3       # a wrong on 0, 1
  b = labels.copy()
  b[2:7] = (labels[2:7] + 1) % 3     # b wrong on 2..6
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  np.savez(tmp_path / "a" / "predictions.npz", test_label=labels, test_rbf=a)
  np.savez(tmp_path / "b" / "predictions.npz", test_label=labels, test_softmax=b)
  t = sweep_rows.paired({"workdir": str(tmp_path / "a"), "classifier": "rbf"},
                        {"workdir": str(tmp_path / "b"), "classifier": "softmax"})
  assert (t["only_a_right"], t["only_b_right"]) == (5, 2)
  np.savez(tmp_path / "b" / "predictions.npz", test_label=labels[::-1], test_softmax=b)
  with pytest.raises(ValueError, match="different images"):
    sweep_rows.paired({"workdir": str(tmp_path / "a"), "classifier": "rbf"},
                      {"workdir": str(tmp_path / "b"), "classifier": "softmax"})


@pytest.mark.parametrize("depth,cached", [("head", True), ("last:3", False), ("all", False)])
def test_set_depth_caches_features_only_for_head_rows(depth, cached):
  c = common.folder_schemes("cars196", "ce", learning_rate=1e-3)
  sweep_rows.set_depth(c, depth, "/cache")
  assert c.model.trainable == depth
  assert c.train.cache_features is cached
  assert c.train.feature_cache_dir == ("/cache" if cached else "")


def test_grid_edge_names_the_end_a_choice_sits_on():
  rows = [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3)]
  assert sweep_rows.grid_edge(rows, {"lr": 3e-4}) == "lowest"
  assert sweep_rows.grid_edge(rows, {"lr": 3e-3}) == "highest"
  assert sweep_rows.grid_edge(rows, {"lr": 1e-3}) is None
  assert sweep_rows.grid_edge(rows[:1], {"lr": 3e-4}) is None  # one rate: no grid
  # Several settings at one rate (sigma) still make a grid of one rate.
  assert sweep_rows.grid_edge([{"lr": 1e-3}, {"lr": 1e-3}], {"lr": 1e-3}) is None


def test_write_summary_draws_the_lr_grid_only_for_a_grid(tmp_path):
  plt = pytest.importorskip("matplotlib.pyplot", reason="optional 'plots' extra")
  sweep = {"gap": [{"scheme": "gap", "lr": lr, "val_top1": v}
                   for lr, v in ((1e-3, 0.60), (3e-4, 0.59), (3e-3, 0.56))],
           "bap": [{"scheme": "bap", "lr": 3e-4, "val_top1": 0.53}]}
  chosen = [sweep_rows.choose(rows) for rows in sweep.values()]
  assert [r["lr"] for r in chosen] == [1e-3, 3e-4]
  sweep_rows.write_summary(str(tmp_path), {"chosen": chosen, "sweep": sweep}, "t")
  png = plt.imread(tmp_path / "lr_grid.png")
  assert png.shape[0] > 100 and png.shape[1] > 100
  assert png[..., :3].std() > 0.05  # lines and text on the white page
  assert (tmp_path / "table.md").read_text() == "t\n"
  one = tmp_path / "one"
  one.mkdir()
  sweep_rows.write_summary(str(one), {"chosen": chosen[1:], "sweep": {"bap": sweep["bap"]}},
                           "t")
  assert not (one / "lr_grid.png").exists()
  assert (one / "summary.json").exists()
