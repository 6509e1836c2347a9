"""benchmarks/sweep_rows.py: the table scripts' rows, choice on val, paired test."""

import json
import os
import subprocess
import sys

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
  diverged = {"val_top1": None, "diverged": "nan", "i": 3}
  assert sweep_rows.choose([diverged] + rows)["i"] == 1
  assert sweep_rows.choose([diverged]) is None


def test_train_run_records_a_diverged_setting_and_lets_the_sweep_go_on(tmp_path,
                                                                      monkeypatch):
  from fgjax import divergence
  from fgjax import train

  def diverge(config, workdir):
    os.makedirs(workdir)
    raise divergence.TrainingDiverged(f"training diverged at step 36 ({config})")

  monkeypatch.setattr(train, "train_and_evaluate", diverge)
  run = tmp_path / "c2f_lr0.001"
  assert not sweep_rows.is_finished(str(run))
  sweep_rows.train_run("cfg", str(run))
  assert sweep_rows.is_finished(str(run))
  row = sweep_rows.diverged_row("c2f_average", 1e-3, None, str(run))
  assert row["val_top1"] is None and "step 36 (cfg)" in row["diverged"]
  assert sweep_rows.val_cell(row) == "diverged"
  assert sweep_rows.val_cell({"val_top1": 0.5}) == "0.500"
  # Any other error is the sweep's to see.
  monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    sweep_rows.train_run("cfg", str(tmp_path / "c2f_lr0.003"))
  assert not sweep_rows.is_finished(str(tmp_path / "c2f_lr0.003"))


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
                   for lr, v in ((1e-3, 0.60), (3e-4, 0.59), (3e-3, 0.56), (1e-2, None))],
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


def _finished(group, name, val, test, labels=None, pred=None, scheme="ce", sigma=0.2):
  run = group / name
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps(results(val, test)))
  (run / "config.json").write_text(json.dumps({"scheme": scheme,
                                               "loss": {"nca": {"sigma": sigma}}}))
  if labels is not None:
    np.savez(run / "predictions.npz", test_label=labels, test_softmax=pred)
  return str(run)


def test_finished_runs_reads_every_run_of_the_group_in_grid_order(tmp_path):
  for name in ("bap_center_aug_lr0.0003", "bap_center_aug_lr3e-05", "gap_aug_lr0.01",
               "loose_lr0.001_s0.5", "loose_lr0.001_s0.2", "gap_lr0.001"):
    _finished(tmp_path, name, 0.5, 0.5)
  (tmp_path / "c2f_lr0.001").mkdir()            # still training: no results.json
  (tmp_path / "module__gkmp_le_lr0.001").mkdir()  # not a table run's name
  (tmp_path / "lr_grid.png").write_bytes(b"")
  found = sweep_rows.finished_runs(str(tmp_path), ["gap_aug", "bap_center_aug", "c2f",
                                                   "loose"])
  assert [(r, lr, s) for r, lr, s, _ in found] == [
      ("gap_aug", 1e-2, None), ("bap_center_aug", 3e-5, None),
      ("bap_center_aug", 3e-4, None), ("loose", 1e-3, 0.2), ("loose", 1e-3, 0.5)]
  assert found[0][3] == str(tmp_path / "gap_aug_lr0.01")
  assert sweep_rows.finished_runs(str(tmp_path / "absent"), ["gap"]) == []


def test_attention_table_reports_every_finished_run_not_only_the_named_ones(tmp_path):
  group = tmp_path / "cars196_224px_10ep_cosine"
  labels = np.arange(20) % 4
  wrong = (labels + 1) % 4
  _finished(group, "gap_aug_lr0.01", 0.60, 0.60, labels, np.where(np.arange(20) < 8,
                                                                  wrong, labels))
  _finished(group, "bap_center_aug_lr0.0003", 0.68, 0.70, labels,
            np.where(np.arange(20) < 2, wrong, labels))
  _finished(group, "bap_center_aug_lr0.001", 0.66, 0.75, labels, labels)
  _finished(group, "crop_drop_lr0.0003", 0.69, 0.70, labels, labels)
  _finished(group, "bap_loose_lr3e-06", 0.62, 0.65, labels, labels, scheme="loose",
            sigma=0.7)
  (group / "bap_center_aug_lr0.003").mkdir()
  # train_and_evaluate writes config.json before the first step, so a diverged run has one.
  (group / "bap_center_aug_lr0.003" / "config.json").write_text(
      (group / "crop_drop_lr0.0003" / "config.json").read_text())
  (group / "bap_center_aug_lr0.003" / sweep_rows.DIVERGED).write_text(
      json.dumps({"message": "training diverged at step 50: loss is nan"}))
  out = subprocess.run(
      [sys.executable, "benchmarks/attention_table.py", "--dataset=cars196",
       "--epochs=10", "--schedule=cosine", "--baseline=gap_aug", "--rows=gap_aug",
       "--lrs=1e-2", f"--workdir={tmp_path}", "--report_only"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, check=True)
  summary = json.loads((group / "summary.json").read_text())
  assert {k: [r["lr"] for r in v] for k, v in summary["sweep"].items()} == {
      "gap_aug": [1e-2], "bap_loose": [3e-6], "crop_drop": [3e-4],
      "bap_center_aug": [3e-4, 1e-3, 3e-3]}
  # The baseline leads the table although ROWS lists crop_drop before it.
  assert [r["scheme"] for r in summary["chosen"]] == ["gap_aug", "bap_loose", "crop_drop",
                                                      "bap_center_aug"]
  # The impostor row's sigma is the one its run trained with (its config.json).
  assert [r["train_sigma"] for r in summary["chosen"]] == [None, 0.7, None, None]
  assert "0.0003: 0.680, 0.001: 0.660, 0.003: diverged" in out.stdout
  chosen = {r["scheme"]: r["lr"] for r in summary["chosen"]}
  assert chosen == {"gap_aug": 1e-2, "bap_loose": 3e-6, "crop_drop": 3e-4,
                    "bap_center_aug": 3e-4}  # by val, not by test
  t = summary["paired_vs_baseline"]["tests"]["bap_center_aug"]
  assert (t["only_a_right"], t["only_b_right"]) == (6, 0)
  assert "bap_center_aug" in out.stdout and (group / "table.md").exists()


def test_schemes_table_reports_runs_of_earlier_calls_with_their_sigmas(tmp_path):
  group = tmp_path / "cars196_efficientnet_lite0_head"
  labels = np.arange(20) % 4
  _finished(group, "ce_lr0.001", 0.60, 0.60, labels, labels)
  for name, val in (("loose_lr0.001_s0.2", 0.62), ("loose_lr0.001_s0.5", 0.66)):
    run = group / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results(val, 0.65, head="rbf")))
    np.savez(run / "predictions.npz", test_label=labels,
             test_rbf=np.where(np.arange(20) < 3, (labels + 1) % 4, labels))
  subprocess.run(
      [sys.executable, "benchmarks/schemes_table.py", "--dataset=cars196",
       "--schemes=ce", "--lrs=1e-3", f"--workdir={tmp_path}", "--report_only"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, check=True)
  summary = json.loads((group / "summary.json").read_text())
  assert [(r["scheme"], r["train_sigma"]) for r in summary["sweep"]["loose"]] == [
      ("loose", 0.2), ("loose", 0.5)]
  assert summary["paired"]["best_impostor"] == "loose"
  assert (summary["paired"]["only_a_right"], summary["paired"]["only_b_right"]) == (0, 3)
