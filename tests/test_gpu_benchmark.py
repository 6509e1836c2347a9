"""benchmarks/gpu.py on CPU: the --smoke run exercises every part, records each as it
goes, and a part that raises is recorded without stopping the others."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"
SCHEMES = ("ce", "ce_extra", "tied", "fixed", "loose")
HAS_TORCH = importlib.util.find_spec("torch") is not None
# Made to raise on purpose: the unchunked NCA record must still run, and everything after.
INJECTED = "nca/fgjax/chunk256"


def run_script(out, *args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("OUT", None)
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--out={out}", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = (pathlib.Path(out) / "gpu_results.jsonl").read_text().splitlines()
  return proc.stdout, [json.loads(line) for line in lines]


def positive_finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_smoke")
  stdout, records = run_script(out, "--smoke", f"--fail={INJECTED}")
  return out, stdout, {(r["part"], r["name"]): r for r in records}, records


def test_one_record_per_part_and_scheme(smoke):
  _, _, by_key, records = smoke
  assert len(records) == len(by_key)  # no record written twice
  assert set(by_key) == {
      ("env", "environment"),
      ("throughput", "fgjax/ce"), ("throughput", "fgjax/loose"),
      ("throughput", "torch/ce"),
      ("nca", "fgjax/unchunked"), ("nca", INJECTED.split("/", 1)[1]), ("nca", "torch"),
      *(("schemes", s) for s in SCHEMES)}
  env = by_key["env", "environment"]
  assert env["status"] == "ok" and env["smoke"] is True and env["backend"] == "cpu"
  assert env["jax"] and env["devices"] and env["date"]


def test_throughputs_are_measured(smoke):
  _, _, by_key, _ = smoke
  for scheme in ("ce", "loose"):
    r = by_key["throughput", f"fgjax/{scheme}"]
    assert r["status"] == "ok", r
    assert r["backbone"] == "small_cnn" and r["image_size"] == 32
    assert positive_finite(r["images_per_s"]) and positive_finite(r["step_ms"])
    assert math.isfinite(r["final_loss"])
    # ce has no impostors; loose trains the NCA term over the run's own impostors.
    assert (r["num_impostors"] is None) == (scheme == "ce")
  assert "nca" in json.dumps(by_key["throughput", "fgjax/loose"]["loss_terms"])
  r = by_key["nca", "fgjax/unchunked"]
  assert r["status"] == "ok", r
  assert r["M"] == 1000 and positive_finite(r["ms_per_call"]) and math.isfinite(r["loss"])


def test_injected_failure_is_recorded_and_the_rest_runs(smoke):
  _, _, by_key, records = smoke
  failed = by_key["nca", INJECTED.split("/", 1)[1]]
  assert failed["status"] == "error" and "injected" in failed["error"]
  assert "Traceback" in failed["traceback"]
  assert [r for r in records if r["status"] == "error"] == [failed]
  later = records[records.index(failed) + 1:]
  assert {r["part"] for r in later} == {"nca", "schemes"}


@pytest.mark.skipif(HAS_TORCH, reason="checks the branch taken without PyTorch")
def test_torch_records_say_skipped_and_why(smoke):
  _, _, by_key, _ = smoke
  for key in (("throughput", "torch/ce"), ("nca", "torch")):
    r = by_key[key]
    assert r["status"] == "skipped", r
    assert "PyTorch comparison skipped" in r["reason"] and "torch" in r["reason"]


def test_scheme_runs_report_their_own_classifier(smoke):
  out, _, by_key, _ = smoke
  for scheme in SCHEMES:
    r = by_key["schemes", scheme]
    assert r["status"] == "ok", r
    assert r["classifier"] == ("softmax" if scheme.startswith("ce") else "rbf")
    assert r["dataset"] == "digits" and r["steps"] == 3
    for split in ("val_top1", "test_top1"):
      assert 0.0 <= r[split] <= 1.0
    assert positive_finite(r["images_per_s"]) and positive_finite(r["train_seconds"])
    assert pathlib.Path(r["workdir"]).parent == pathlib.Path(out) / "runs"
    assert (pathlib.Path(r["workdir"]) / "results.json").exists()
  assert by_key["schemes", "loose"]["train_sigma"] == 0.5
  assert by_key["schemes", "fixed"]["train_sigma"] == 0.2


def test_markdown_summary_printed_and_written(smoke):
  out, stdout, _, _ = smoke
  written = (pathlib.Path(out) / "gpu_summary.md").read_text()
  assert "## One short run per scheme" in stdout and "| loose | digits | rbf |" in stdout
  assert written.strip() in stdout
  assert "12 records, 1 errors." in written


def test_missing_cars196_is_a_clear_error(tmp_path):
  # The full (non-smoke) scheme path: it checks the data folder before building anything.
  _, records = run_script(tmp_path, "--parts=schemes", "--schemes=ce,loose",
                          f"--data_root={tmp_path / 'no_cars196'}")
  assert [r["name"] for r in records] == ["ce", "loose"]
  for r in records:
    assert r["status"] == "error" and "cars196 not found" in r["error"]
    assert "--data_root" in r["error"]
