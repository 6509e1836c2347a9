"""launch.py: config file + --config.x.y overrides reach train_and_evaluate."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_launch(tmp_path, *overrides):
  return subprocess.run(
      [sys.executable, "launch.py", "--config=configs/digits_loose.py",
       f"--workdir={tmp_path}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=300)


def test_override_is_validated_before_any_compute(tmp_path):
  proc = run_launch(tmp_path, "--config.model.backbone=bogus",
                    "--config.data.holdout_classes=(0,5)")
  assert proc.returncode != 0
  assert "config.model.backbone='bogus' is unknown" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_field_is_rejected(tmp_path):
  proc = run_launch(tmp_path, "--config.train.num_epoch=3")
  assert proc.returncode != 0
  assert "num_epoch" in proc.stderr
