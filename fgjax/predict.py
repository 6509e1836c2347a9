"""Classifies image files with a trained fgjax model.

  python -m fgjax.predict --workdir DIR image.jpg [more images or folders] [--json]
  fgjax-predict --artifact DIR photos/ --reject_entropy 2.5 --engine onnx-int8

Prints, per image, the top-k classes with probabilities, the entropy of the predicted
distribution (paper section 4.2) and "unknown" when the entropy is above
`--reject_entropy`. With `--early_exit` (an artifact trained with
config.early_exit.exits) the backbone runs segment by segment and stops at the first
exit confident enough (fgjax.early_exit): it prints the exit that answered and the
exit head's top-k scores. Unreadable images are reported per file and do not stop the
others.
`--workdir` reads `<workdir>/artifact`, which training writes at the end.
"""

import json
import math
import os
import sys
from typing import Any, Iterable, Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from fgjax import artifact
from fgjax import evaluate
from fgjax import visualize
from fgjax.data import IMAGE_EXTENSIONS
from fgjax.data import transforms

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (uses <workdir>/artifact).")
_ARTIFACT = flags.DEFINE_string("artifact", None, "An exported artifact directory.")
_TOPK = flags.DEFINE_integer("topk", 5, "Classes to print per image.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON document instead of text.")
_REJECT = flags.DEFINE_float("reject_entropy", None,
                             "Predict 'unknown' above this entropy (nats).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
_EARLY_EXIT = flags.DEFINE_bool(
    "early_exit", False, "Sequential early-exit inference with the artifact's exit "
    "heads and thresholds (jax.jit; reports which exit answered each image).")
_EXPLAIN = flags.DEFINE_string(
    "explain", None, "Write PNG grids of the images with the network's heat map and box "
    "(ELoPE's localization) into this directory.")
_ENGINE = flags.DEFINE_enum(
    "engine", "jit", artifact.ENGINES, "Backbone engine: jit (any device), xla (CPU: "
    "BN folded, fixed batch), onnx (CPU, onnxruntime, fp32) or onnx-int8 (CPU, the "
    "onnx graph quantised to int8 from the calibration stored at export) or openvino "
    "(CPU, OpenVINO at --precision; pip install 'fgjax[openvino]').")
_PRECISION = flags.DEFINE_enum(
    "precision", "fp32", ("fp32", "bf16", "int8"),
    "Arithmetic of --engine=openvino: fp32 (default), bf16 (CPUs with bf16) or int8 "
    "(the artifact's int8 calibration).")


def expand_paths(paths: Iterable[str]) -> list[str]:
  """Files as given; folders expanded (recursively, sorted) to their image files."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files)
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
               and not f.startswith(".")]
    else:
      out.append(p)
  return out


def _check_options(topk: int, reject_entropy: Optional[float], batch_size: int) -> None:
  # NaN compares False with everything: it would make no image (or, negated, every
  # image) "unknown" without a word, so it is refused like a negative threshold.
  if reject_entropy is not None and not (math.isfinite(reject_entropy) and
                                         reject_entropy >= 0):
    raise ValueError(f"--reject_entropy={reject_entropy} must be a finite entropy >= 0 "
                     "(nats; log(number of classes) is the largest possible), or unset.")
  if topk < 1:
    raise ValueError(f"--topk={topk} must be >= 1.")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be >= 1.")


def predict_files(model: artifact.Model, paths: Sequence[str], *, topk: int = 5,
                  reject_entropy: Optional[float] = None, batch_size: int = 16,
                  explain_dir: Optional[str] = None,
                  early_exit: bool = False) -> list[dict[str, Any]]:
  """One result dict per path: {'path', 'top': [(class, prob)], 'entropy', 'unknown'}
  or {'path', 'error'} for a file that could not be read.

  explain_dir: also write, per batch, a PNG grid of the images with the network's heat
  map and box (ELoPE: the localization module's; BAP networks: the mean attention map;
  else the channel mean of the last conv map) to <explain_dir>/explain_<k>.png, and add
  'box' and 'explained' to each result. BAP networks also get every attention map
  beside their mean in <explain_dir>/attention_<k>.png ('attention_maps' of a result).
  early_exit: classify by sequential early exit; each result is {'path', 'exit' (the
  backbone output whose head answered), 'top': [{'class', 'index', 'score'}]} (exit
  heads' scores, e.g. SVM decision values, are not probabilities).
  """
  _check_options(topk, reject_entropy, batch_size)
  if early_exit and reject_entropy is not None:
    raise ValueError("--reject_entropy needs class probabilities; --early_exit reports "
                     "exit head scores instead. Use one of the two.")
  if early_exit:
    sequential = model.early_exit(max_batch=batch_size)
    exit_names = model.meta["early_exit"]["exits"]
  size, resize = model.meta["image_size"], model.meta["resize_size"]
  results: list[Optional[dict[str, Any]]] = [None] * len(paths)
  pending: list[tuple[int, np.ndarray]] = []
  pictures = [0]

  def explain(images, batch):
    looks = model.explain(images)
    path = os.path.join(explain_dir, f"explain_{pictures[0]:03d}.png")
    pictures[0] += 1
    titles = [f"{os.path.basename(paths[i])}: {results[i]['top'][0]['class']}"
              for i, _ in batch]
    originals = np.stack([im for _, im in batch])
    visualize.heatmap_grid(path, originals, looks["heatmap"], looks["box"], titles=titles)
    maps = None
    if "attention" in looks:
      maps = visualize.attention_grid(
          os.path.join(explain_dir, f"attention_{pictures[0] - 1:03d}.png"), originals,
          looks["attention"], titles=titles)
    for (i, _), box in zip(batch, looks["box"]):
      results[i].update(box=[float(v) for v in box], explained=path)
      if maps:
        results[i]["attention_maps"] = maps

  def flush():
    if not pending:
      return
    images = transforms.normalize(np.stack([im for _, im in pending]), model.mean,
                                  model.std)
    if early_exit:
      out = sequential(images)
      for (i, _), scores, at in zip(pending, out["scores"], out["exit"]):
        order = np.argsort(-scores, kind="stable")[:topk]
        results[i] = {"path": paths[i], "exit": exit_names[int(at)], "top": [
            {"class": model.class_names[j], "index": int(j), "score": float(scores[j])}
            for j in order]}
      if explain_dir:
        explain(images, list(pending))
      pending.clear()
      return
    log_probs = model.log_probs(images)
    for (i, _), lp in zip(pending, log_probs):
      probs = np.exp(lp.astype(np.float64))
      entropy = float(evaluate.entropy(lp[None])[0])
      order = np.argsort(-probs, kind="stable")[:topk]
      results[i] = {
          "path": paths[i],
          "top": [{"class": model.class_names[j], "index": int(j),
                   "prob": float(probs[j])} for j in order],
          "entropy": entropy,
          "unknown": bool(reject_entropy is not None and entropy > reject_entropy),
      }
    if explain_dir:
      explain(images, list(pending))
    pending.clear()

  for i, path in enumerate(paths):
    try:
      image = transforms.decode_image(path, min_size=resize)
    except Exception as e:  # Any decoder failure is this file's problem only.
      results[i] = {"path": path, "error": f"{type(e).__name__}: {e}"}
      continue
    pending.append((i, transforms.eval_transform(image, image_size=size,
                                                 resize_size=resize)))
    if len(pending) == batch_size:
      flush()
  flush()
  return results


def _format(r: dict[str, Any]) -> str:
  if "error" in r:
    return f"{r['path']}: ERROR {r['error']}"
  if "exit" in r:
    return "\n".join([f"{r['path']}: answered at exit {r['exit']}"] + [
        f"  {t['score']:.4f}  {t['class']}" for t in r["top"]])
  head = f"{r['path']}: entropy {r['entropy']:.3f}" + ("  -> unknown" if r["unknown"] else "")
  lines = [head] + [f"  {t['prob']:.4f}  {t['class']}" for t in r["top"]]
  return "\n".join(lines)


def main(argv):
  paths = expand_paths(argv[1:])
  if not paths:
    raise app.UsageError("Give at least one image file or folder.")
  if bool(_WORKDIR.value) == bool(_ARTIFACT.value):
    raise app.UsageError("Give exactly one of --workdir or --artifact.")
  path = _ARTIFACT.value or os.path.join(_WORKDIR.value, "artifact")
  try:
    model = artifact.Model(path, engine=_ENGINE.value, batch_size=_BATCH.value,
                           precision=_PRECISION.value)
  # Damaged or incomplete, an engine that refuses the network or is not installed:
  # the message is the fix.
  except (ValueError, ImportError) as e:
    sys.exit(f"fgjax.predict: {e}")
  results = predict_files(model, paths, topk=_TOPK.value, reject_entropy=_REJECT.value,
                          batch_size=_BATCH.value, explain_dir=_EXPLAIN.value,
                          early_exit=_EARLY_EXIT.value)
  if _JSON.value:
    print(json.dumps({"model": path, "results": results}, indent=2))
  else:
    print("\n".join(_format(r) for r in results))
  if all("error" in r for r in results):
    sys.exit(1)


def run():
  """Console-script entry point (`fgjax-predict`)."""
  app.run(main)


if __name__ == "__main__":
  run()
