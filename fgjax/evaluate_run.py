"""Evaluation of a finished training run: accuracy per split, sigma, PQ, open set.

The step after training in `fgjax.train.train_and_evaluate`: the network's outputs on
the validation and test splits are computed once, the RBF rule's sigma is chosen on
validation (eq. 3, paper protocol), impostors are compressed when configured (paper
section 4, "Impostors compression"), and with held-out classes the open-set entropy
report of section 4.2 is written next to results.json.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import evaluate
from fgjax import impostors as impostors_lib
from fgjax import quantize


def evaluate_state(trainer, state: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
  """Accuracy per split; sigma of the RBF rule chosen on the validation split.

  Args:
    trainer: the run's `fgjax.train.Trainer` (config, splits, network outputs).
    state: the final training state.

  Returns:
    (results, (pq, codes)): the results.json dict, and the product quantizer and
    impostor codes when config.impostors.pq_bytes is set (else (None, None)), which
    the exported artifact stores instead of the float impostors.
  """
  config = trainer.config
  variables = {"params": state["params"]["net"], "batch_stats": state["batch_stats"]}
  imps = state["params"]["impostors"]
  results: dict[str, Any] = {"splits": {}}
  memory = {"network_params_bytes": int(sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]["net"])))}
  pq, codes = None, None
  if imps is not None:
    imps = impostors_lib.ImpostorSet(np.asarray(imps.centers), np.asarray(imps.labels))
    memory["impostors_float32_bytes"] = int(imps.centers.size * 4)
    if config.impostors.pq_bytes:
      # Fixed: the quantizer trained before training; other schemes: compress the
      # final impostors after training (deployment only).
      if "pq" in state:
        pq = quantize.ProductQuantizer(**state["pq"])
      else:
        pq = trainer.train_quantizer(imps.centers)
      pq = quantize.ProductQuantizer(*(np.asarray(x) for x in pq))
      codes = np.asarray(quantize.encode(pq, imps.centers))
      imps = imps._replace(centers=np.asarray(quantize.decode(pq, codes)))
      memory["pq"] = quantize.nbytes(pq, codes)
      results["pq_applied"] = ("before training" if trainer.compress_before_training
                               else "after training")
  results["memory"] = memory
  splits = {"val": trainer.splits.val, "test": trainer.splits.test}
  outputs = {name: trainer.split_outputs(variables, name)
             for name, src in splits.items() if src is not None and len(src)}
  sigma = float(config.impostors.sigma)
  if imps is not None:
    grid = list(config.eval.sigma_grid) or [sigma]
    selection_split = "val" if "val" in outputs else None
    if selection_split:
      sigma, table = evaluate.select_sigma(
          outputs["val"]["embedding"], outputs["val"]["label"], imps, grid,
          trainer.num_classes)
      results["sigma_sweep_val_top1"] = table
    results["sigma_selected_on"] = selection_split or "none (config.impostors.sigma)"
  results["sigma"] = sigma
  for name, out in outputs.items():
    results["splits"][name] = evaluate.classify_split(
        out, impostors=imps, sigma=sigma, num_classes=trainer.num_classes,
        search=config.eval.search, k=int(config.eval.k))
  if trainer.splits.unknown is not None and "test" in outputs:
    results["openset"] = _openset(trainer, variables, imps, sigma, outputs["test"])
  results["num_classes"] = trainer.num_classes
  results["num_impostors"] = None if imps is None else int(imps.centers.shape[0])
  return results, (pq, codes)


def _openset(trainer, variables, imps, sigma: float,
             known: dict[str, np.ndarray]) -> dict[str, Any]:
  """Paper 4.2: entropy of known-class test images vs images of held-out classes."""
  from fgjax import openset  # matplotlib is only needed for the histogram.
  unknown = trainer.split_outputs(variables, "unknown")

  def log_probs(out):
    if imps is not None:
      return evaluate.rbf_log_probs(out["embedding"], imps, sigma, trainer.num_classes)
    return np.asarray(jax.nn.log_softmax(jnp.asarray(out["logits"]), axis=-1))

  h_known = evaluate.entropy(log_probs(known))
  h_unknown = evaluate.entropy(log_probs(unknown))
  report = openset.openset_report(h_known, h_unknown)
  report["classifier"] = "rbf" if imps is not None else "softmax"
  if jax.process_index() == 0:
    np.savez(os.path.join(trainer.workdir, "openset_entropy.npz"), known=h_known,
             unknown=h_unknown)
    try:
      report["histogram"] = openset.save_entropy_histogram(
          os.path.join(trainer.workdir, "openset_entropy.png"), h_known, h_unknown,
          title=f"{trainer.scheme.name} ({report['classifier']})")
    except ImportError as e:  # The numbers stay; only the picture needs matplotlib.
      report["histogram"] = f"not drawn: {e}"
  return report


def flat_scalars(results: dict[str, Any]) -> dict[str, float]:
  """{"test/rbf_top1": ...}: the accuracies of `results` as TensorBoard scalars."""
  out = {}
  for split, r in results["splits"].items():
    for head in ("rbf", "softmax"):
      for k, v in r.get(head, {}).items():
        out[f"{split}/{head}_{k}"] = v
  return out
