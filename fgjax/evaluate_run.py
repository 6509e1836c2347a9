"""Evaluation of a finished training run: accuracy per split, sigma, open set.

The step after training in `fgjax.train.train_and_evaluate`, on explicit arguments:
the network's outputs on the validation and test splits (computed once), the final
impostors (decoded from their PQ codes when compressed), and the eval config. The RBF
rule's sigma is chosen on validation (eq. 3, paper protocol); with held-out classes the
open-set entropy report of section 4.2 is written next to results.json.
"""

import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import calibration
from fgjax import evaluate
from fgjax import impostors as impostors_lib


def evaluate_splits(outputs: dict[str, dict[str, np.ndarray]], *,
                    impostors: Optional[impostors_lib.ImpostorSet], num_classes: int,
                    eval_config, default_sigma: float,
                    extra_logits: Sequence[str] = (),
                    predictions_file: Optional[str] = None) -> dict[str, Any]:
  """Accuracies of every split in `outputs`; sigma of the RBF rule chosen on 'val'.

  Args:
    outputs: {split: {'embedding' (N, E), 'logits' (N, C) for ConvNets, 'label'}}.
    impostors: host ImpostorSet, or None for networks scored by their softmax head.
    num_classes: C.
    eval_config: config.eval (sigma_grid, search, k).
    default_sigma: the sigma used when there is no grid or no validation split.
    extra_logits: more (N, C) outputs of `outputs` scored like 'logits' (top-k,
      '<split>_<name>' predictions), under each split's 'heads': {name: accuracies}.
    predictions_file: where to write every split's labels and each head's top-1
      class per image (npz: '<split>_label', '<split>_rbf', '<split>_softmax'), the
      input of a paired test between runs (fgjax.stats.mcnemar); None: not written.

  Returns:
    {'splits': {split: accuracies}, 'sigma', and for the RBF rule
    'sigma_sweep_val_top1', 'sigma_selected_on'}.
  """
  results: dict[str, Any] = {"splits": {}}
  sigma = float(default_sigma)
  criterion = eval_config.get("sigma_criterion", "top1")
  if impostors is not None:
    grid = list(eval_config.sigma_grid) or [sigma]
    if "val" in outputs:
      sigma, table = evaluate.select_sigma(
          outputs["val"]["embedding"], outputs["val"]["label"], impostors, grid,
          num_classes, criterion)
      results[f"sigma_sweep_val_{criterion}"] = table
    results["sigma_selected_on"] = (f"val {criterion}" if "val" in outputs
                                    else "none (config.loss.nca.sigma)")
  results["sigma"] = sigma
  # Temperature scaling of the softmax on val (Guo et al. 2017): the fair
  # calibration baseline for the RBF rule.
  temperature = None
  if "val" in outputs and "logits" in outputs["val"]:
    temperature = calibration.fit_temperature(outputs["val"]["logits"],
                                              outputs["val"]["label"])
    results["temperature"] = temperature
  arrays = {}
  for name, out in outputs.items():
    predictions: dict[str, np.ndarray] = {}
    results["splits"][name] = evaluate.classify_split(
        out, impostors=impostors, sigma=sigma, num_classes=num_classes,
        search=eval_config.search, k=int(eval_config.k), temperature=temperature,
        predictions=predictions)
    arrays[f"{name}_label"] = np.asarray(out["label"], np.int32)
    arrays.update({f"{name}_{head}": p for head, p in predictions.items()})
    if extra_logits:
      results["splits"][name]["heads"] = {
          head: evaluate.topk_accuracy(out[head], out["label"], (1, 5))
          for head in extra_logits}
      arrays.update({f"{name}_{head}": np.asarray(out[head]).argmax(-1).astype(np.int32)
                     for head in extra_logits})
  if predictions_file is not None:
    np.savez(predictions_file, **arrays)
  return results


def openset(known: dict[str, np.ndarray], unknown: dict[str, np.ndarray], *,
            impostors: Optional[impostors_lib.ImpostorSet], sigma: float,
            num_classes: int, workdir: Optional[str], title: str) -> dict[str, Any]:
  """Paper 4.2: entropy of known-class test images vs images of held-out classes.

  Writes openset_entropy.npz and the histogram PNG into `workdir` (when given).
  """
  from fgjax import openset as openset_lib  # matplotlib is only needed for the picture.

  def log_probs(out):
    if impostors is not None:
      return evaluate.rbf_log_probs(out["embedding"], impostors, sigma, num_classes)
    return np.asarray(jax.nn.log_softmax(jnp.asarray(out["logits"]), axis=-1))

  h_known = evaluate.entropy(log_probs(known))
  h_unknown = evaluate.entropy(log_probs(unknown))
  report = openset_lib.openset_report(h_known, h_unknown)
  report["classifier"] = "rbf" if impostors is not None else "softmax"
  if workdir is not None:
    np.savez(os.path.join(workdir, "openset_entropy.npz"), known=h_known,
             unknown=h_unknown)
    try:
      report["histogram"] = openset_lib.save_entropy_histogram(
          os.path.join(workdir, "openset_entropy.png"), h_known, h_unknown,
          title=f"{title} ({report['classifier']})")
    except ImportError as e:  # The numbers stay; only the picture needs matplotlib.
      report["histogram"] = f"not drawn: {e}"
  return report


def localization(outputs: dict[str, np.ndarray], *, tau: float) -> dict[str, Any]:
  """ELoPE Table 4 on one split: the fraction of images whose box has IoU >= 0.5 with
  the ground truth, for the localization module's boxes ('box', when the network has
  one) and for the classifier's own mean map of the image ('heatmap_target' of the
  localized network, else 'mean_map'); boxes from heat maps by
  localize.heatmap_boxes(., tau).

  With or without ground truth, '<boxes>_area' is the boxes' mean area (fraction of
  the image) and '<boxes>_whole' the fraction of boxes that are the whole image: on
  images already cropped to the object the boxes keep everything, and cropping to
  them changes nothing.

  Args:
    outputs: network outputs of the split with 'true_box' (N, 4) (sources without
      boxes give no 'true_box': then no accuracy is reported).
  """
  from fgjax.models import localize  # pylint: disable=g-import-not-at-top
  heat = outputs["heatmap_target"] if "heatmap_target" in outputs else outputs["mean_map"]
  report: dict[str, Any] = {"num_examples": int(len(heat)), "tau": float(tau)}
  mean_boxes = localize.heatmap_boxes(jnp.asarray(heat), tau)
  for name, boxes in (("mean_map", mean_boxes), ("module", outputs.get("box"))):
    if boxes is not None:
      boxes = np.asarray(boxes, np.float64)
      area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
      report[f"{name}_area"] = float(area.mean())
      report[f"{name}_whole"] = float(np.mean(np.all(
          np.abs(boxes - [0.0, 0.0, 1.0, 1.0]) < 1e-6, axis=1)))
  if "true_box" not in outputs:
    report["accuracy"] = "no ground-truth boxes in this split's source"
    return report
  truth = jnp.asarray(outputs["true_box"])
  report["mean_map_iou50"] = localize.localization_accuracy(mean_boxes, truth)
  if "box" in outputs:
    report["module_iou50"] = localize.localization_accuracy(jnp.asarray(outputs["box"]),
                                                            truth)
  return report


def flat_scalars(results: dict[str, Any]) -> dict[str, float]:
  """{"test/rbf_top1": ...}: the accuracies of `results` as TensorBoard scalars."""
  out = {}
  for split, r in results["splits"].items():
    for head in ("rbf", "softmax"):
      for k, v in r.get(head, {}).items():
        out[f"{split}/{head}_{k}"] = v
    for head, report in r.get("calibration", {}).items():
      out[f"{split}/{head}_ece"] = report["ece"]
      out[f"{split}/{head}_nll"] = report["nll"]
  return out
