"""benchmarks/gpu.py's records: one JSON line each, written as it is measured, and the
Markdown summary rewritten after each, so a run killed at its time limit keeps both."""

import datetime
import json
import os
import time
import traceback
from typing import Any, Callable

import numpy as np

RESULTS_FILE = "gpu_results.jsonl"
SUMMARY_FILE = "gpu_summary.md"


class Skipped(Exception):
  """A record that cannot be measured here (e.g. no PyTorch with CUDA): its reason."""


class Recorder:
  """Appends one JSON line per record and flushes it, so a killed run loses nothing."""

  def __init__(self, out_dir: str, fail: tuple[str, ...] = (), budget_s: float = 0.0):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, RESULTS_FILE)
    self.summary_path = os.path.join(out_dir, SUMMARY_FILE)
    self.fail = set(fail)
    self.start, self.budget_s = time.perf_counter(), budget_s
    self.records: list[dict[str, Any]] = []
    # A rerun into the same folder starts a fresh file: the summary is of this run.
    open(self.path, "w").close()

  def record(self, part: str, name: str, fn: Callable[[], dict[str, Any]]
             ) -> dict[str, Any]:
    """Runs fn() and stores {'part', 'name', 'status', ...}: its dict when it returns,
    the error (and the traceback's end) when it raises, the reason when it skips."""
    key = f"{part}/{name}"
    print(f"# {key} ...", flush=True)
    start = time.perf_counter()
    rec: dict[str, Any] = {"part": part, "name": name}
    try:
      if self.budget_s and start - self.start > self.budget_s:
        raise Skipped(f"--time_budget_s={self.budget_s:g} spent before it started")
      if key in self.fail:
        raise RuntimeError(f"--fail={key}: injected failure")
      rec.update(fn())
      rec["status"] = "ok"
    except Skipped as e:
      rec.update(status="skipped", reason=str(e))
    except Exception as e:  # pylint: disable=broad-except
      # Any failure, so that the other parts still run; the record says which.
      rec.update(status="error", error=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc()[-2000:])
    rec["seconds"] = round(time.perf_counter() - start, 3)
    rec["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    with open(self.path, "a") as f:
      f.write(json.dumps(rec, default=_json_default) + "\n")
    self.records.append(rec)
    # Rewritten after every record: a run killed at its time limit keeps a summary too.
    with open(self.summary_path, "w") as f:
      f.write(summary(self.records) + "\n")
    print(f"# {key}: {rec['status']} {_short(rec)}", flush=True)
    return rec


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return str(x)


def _short(rec: dict[str, Any]) -> str:
  if rec["status"] == "error":
    return rec["error"]
  if rec["status"] == "skipped":
    return rec["reason"]
  keys = ("images_per_s", "ms_per_call", "test_top1", "val_top1", "platform")
  return " ".join(f"{k}={rec[k]}" for k in keys if k in rec)


def _cell(x) -> str:
  if x is None:
    return ""
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    note = r.get("error") or r.get("reason") or ""
    cells = [_cell(r.get(c)) if c != "status" else f"{r['status']} {note}".strip()
             for c in columns]
    lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
  return lines


def _ratios(records: list[dict[str, Any]]) -> list[str]:
  """fgjax against PyTorch eager where both were measured."""
  ok = {(r["part"], r["name"]): r for r in records if r["status"] == "ok"}
  lines = []
  pairs = (("throughput", "fgjax/ce", "torch/ce", "images_per_s", "training images/s"),
           ("nca", "fgjax/unchunked", "torch", "ms_per_call", "NCA ms per call"))
  for part, ours, theirs, key, what in pairs:
    if (part, ours) in ok and (part, theirs) in ok:
      a, b = ok[part, ours][key], ok[part, theirs][key]
      lines.append(f"{what}: fgjax {a:.4g}, PyTorch eager {b:.4g} "
                   f"(fgjax / PyTorch = {a / b:.2f}).")
  return lines + ([""] if lines else [])


def summary(records: list[dict[str, Any]]) -> str:
  """Markdown: the environment, then one table per part."""
  lines = ["# benchmarks/gpu.py", ""]
  for r in records:
    if r["part"] == "env" and r["status"] == "ok":
      lines += [f"{r['date']}, commit {r['commit']}, jax {r['jax']} ({r['backend']}: "
                f"{r['device_kind']}), torch {r['torch']}, smoke={r['smoke']}", ""]
  parts = {
      "throughput": ("Training throughput, all layers (random images, one batch)",
                     ["name", "backbone", "batch_size", "image_size", "compile_s",
                      "step_ms", "images_per_s", "status"]),
      "nca": ("NCA loss forward + backward",
              ["name", "M", "B", "d", "chunk_size", "ms_per_call", "temp_bytes",
               "peak_device_bytes", "loss", "status"]),
      "schemes": ("One short run per scheme",
                  ["name", "dataset", "classifier", "steps", "val_top1", "test_top1",
                   "train_seconds", "images_per_s", "status"])}
  for part, (title, columns) in parts.items():
    rows = [r for r in records if r["part"] == part]
    if rows:
      lines += [f"## {title}", ""] + _table(rows, columns) + [""]
  lines += _ratios(records)
  errors = [r for r in records if r["status"] == "error"]
  lines.append(f"{len(records)} records, {len(errors)} errors.")
  return "\n".join(lines)
