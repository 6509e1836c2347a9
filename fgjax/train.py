"""train_and_evaluate: the training loop, the same for every network, loss and policy.

Data flow (../shared/DESIGN.md): config -> data splits (fgjax.data) -> network by name
(fgjax.models.nets) -> loss terms (fgjax.objectives) and impostor policy
(fgjax.impostor_policies), resolved from the scheme preset (fgjax.schemes) -> a
`TrainState` (fgjax.train_state), created or restored from orbax checkpoints -> the one
jitted update (fgjax.update) over batches sharded along the device mesh -> evaluation
(fgjax.evaluate_run) -> results.json and the exported artifact (fgjax.artifact).

The workdir guarantees (fgjax.workdir): a workdir of another config is refused before
anything is written; a killed run resumes from its latest checkpoint and ends with the
same state, metrics.jsonl (each step once) and results.json (apart from times) as an
uninterrupted run.
"""

import os
import subprocess
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fgjax import artifact
from fgjax import checkpoints
from fgjax import config_checks
from fgjax import data
from fgjax import divergence
from fgjax import evaluate_run
from fgjax import impostor_policies
from fgjax import impostors as impostors_lib
from fgjax import init_from
from fgjax import metric_writer
from fgjax import objectives
from fgjax import optim
from fgjax import parallel
from fgjax import quantize
from fgjax import schemes
from fgjax import split_outputs as split_outputs_lib
from fgjax import train_state as train_state_lib
from fgjax import update as update_lib
from fgjax import visualize
from fgjax import workdir as workdir_lib
from fgjax.models import bap
from fgjax.models import localize
from fgjax.models import nets
from fgjax.models import xla_cpu

# Per-image top-1 of every split and head (fgjax.evaluate_run.evaluate_splits).
PREDICTIONS_FILE = "predictions.npz"


class _PolicyContext:
  """What impostor policy hooks may use from the run (impostor_policies.Context)."""

  def __init__(self, outputs: split_outputs_lib.SplitOutputs,
               layout: train_state_lib.Layout, total_steps: int):
    self._outputs, self._layout = outputs, layout
    self.steps_per_epoch, self.total_steps = outputs.steps_per_epoch, total_steps

  def train_embeddings(self, state):
    return self._outputs.train_embeddings(state.variables())

  def place(self, state):
    return self._layout.place(state)


class Run:
  """The parts of one training run, built from a config in a fixed order.

  Nothing here computes on the data: building a Run only validates and wires. Attributes
  are documented where they are set.
  """

  def __init__(self, config):
    config_checks.validate(config)
    self.config = config
    self.resolved = schemes.resolve(config)
    devices = jax.devices()
    if config.get("num_devices"):
      if config.num_devices > len(devices):
        raise ValueError(f"config.num_devices={config.num_devices} but only "
                         f"{len(devices)} devices are visible.")
      devices = devices[:config.num_devices]
    self.mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(config.train.batch_size, self.mesh,
                              "config.train.batch_size")
    parallel.check_batch_size(config.eval.batch_size, self.mesh, "config.eval.batch_size")
    self.splits = data.get_splits(config.data)
    self.num_classes = self.splits.num_classes
    self.network = nets.build(config.model, self.num_classes, net=self.resolved.net,
                              cached_tail=optim.cached_tail(config))
    self.objective = objectives.build(self.resolved.terms, config.loss)
    self.policy = impostor_policies.make(self.resolved.policy, config)
    self.output_shapes = self.network.output_shapes(config.input.image_size)
    # Checked before training: evaluation is where a wrong name would surface.
    self.extra_logits = tuple(config.eval.get("extra_logits", ()))
    unknown = [k for k in self.extra_logits if k not in self.output_shapes]
    if unknown:
      raise ValueError(f"config.eval.extra_logits names {unknown}, which net "
                       f"{self.resolved.net!r} does not output; it outputs "
                       f"{sorted(self.output_shapes)}.")
    abstract_params = jax.eval_shape(
        lambda: self.network.init(config.seed, config.input.image_size))
    self._abstract_variables = abstract_params
    config_checks.check_compatible(self.resolved, self.network, self.objective,
                                   self.policy, self.output_shapes,
                                   abstract_params["params"],
                                   schemes.split_names(config.model.frozen))
    self._source = None  # The init_from checkpoint, loaded when first needed.
    self.outputs = split_outputs_lib.SplitOutputs(
        self.network, self.splits, self.mesh, config, self.initial_variables,
        {"init_from": init_from.stamp(config.init_from)} if config.get("init_from")
        else None)
    self.steps_per_epoch = self.outputs.steps_per_epoch
    if self.steps_per_epoch < 1:
      raise ValueError(f"config.train.batch_size={config.train.batch_size} is larger "
                       f"than the training split ({len(self.splits.train)} images).")
    self.total_steps = (int(config.train.num_steps) if config.train.get("num_steps")
                        else int(config.train.num_epochs) * self.steps_per_epoch)
    frozen_groups = schemes.split_names(config.model.frozen)
    if config.train.cache_features:
      # Cached trunk outputs stand for the trunk's params: they must not move (weight
      # decay alone would drift them, and the artifact would no longer match).
      frozen_groups += tuple(g for g in self.network.trunk_groups if g != "backbone")
    self.frozen = optim.frozen_paths(config.model.trainable, self.network.spec.blocks,
                                     frozen_groups)
    self.forward = update_lib.forward_mode(config.model.trainable,
                                           bool(config.train.cache_features))
    abstract_imps, self._abstract_policy_state = self.policy.abstract(
        len(self.splits.train), int(self.output_shapes["embedding"].shape[-1]))
    self._abstract_impostors = abstract_imps
    self.layout = train_state_lib.Layout(
        self.mesh, len(self.splits.train) if abstract_imps is not None else 0,
        self.policy.row_fields)
    labels = optim.trainable_labels(
        train_state_lib.trainable_tree({"net": abstract_params["params"],
                                        "impostors": abstract_imps}, self.policy.trainable),
        train_impostors=self.policy.trainable, frozen=self.frozen)
    # The optimiser exists before any state: creating and restoring use the same one.
    self.tx = optim.make_optimizer(config, labels, self.total_steps)

  def _loss_state(self):
    return self.objective.init_state(self.num_classes, self.output_shapes)

  def _init_from(self) -> Optional[dict[str, Any]]:
    if self.config.get("init_from") and self._source is None:
      self._source = init_from.load(self.config.init_from)
    return self._source

  def initial_variables(self) -> dict[str, Any]:
    """Protocol step 1: the network's variables before training (config.init_from's
    network where one is given)."""
    config = self.config
    variables = self.network.init(config.seed, config.input.image_size)
    source = self._init_from()
    if source is None:
      return variables
    net = source["params"]["net"]
    merged = {"params": init_from.merge(variables["params"], net, "params")}
    if "batch_stats" in variables:
      merged["batch_stats"] = init_from.merge(
          variables["batch_stats"], source.get("batch_stats", {}), "batch_stats")
    return self.network.module.complete(merged, loaded=set(net))

  def initial_state(self) -> train_state_lib.TrainState:
    """Protocol steps 1-3: initial network, impostors from its embeddings, rescale.

    With config.init_from, the parts it names come from that run instead
    (fgjax.init_from).
    """
    config = self.config
    variables = self.initial_variables()
    loss_state = self._loss_state()
    source = self._init_from()
    parts = init_from.parse_parts(config.init_from_parts) if source else ()
    if "loss_state" in parts:
      loss_state = init_from.merge(loss_state, source.get("loss_state", {}),
                                   "loss_state")
    params = variables["params"]
    if "impostors" in parts and self.policy.uses_impostors:
      imps, policy_state = self._source_impostors(source)
    else:
      emb = labels = None
      if self.policy.uses_impostors:
        emb, labels = self.outputs.train_embeddings(variables)
      params, imps, policy_state = self.policy.init(self.network, params, emb, labels)
    state = train_state_lib.create(
        params=params, batch_stats=variables.get("batch_stats", {}), impostors=imps,
        loss_state=loss_state, impostor_state=policy_state, tx=self.tx,
        train_centers=self.policy.trainable)
    return self.layout.place(state)

  def _source_impostors(self, source):
    """The impostors and policy state of an init_from source, checked against ours."""
    imps = source["params"].get("impostors")
    if imps:  # Written on any device count: without that run's padding rows.
      imps = impostors_lib.present(impostors_lib.ImpostorSet(**imps))._asdict()
    if not imps:
      raise ValueError(f"config.init_from_parts names 'impostors' but "
                       f"{self.config.init_from} has none; leave it out to compute "
                       "them from the loaded network.")
    zeros = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: np.zeros(a.shape, a.dtype), tree)
    target = zeros(self._abstract_impostors)
    merged = init_from.merge(target, impostors_lib.ImpostorSet(**imps), "impostors")
    state = init_from.merge(zeros(self._abstract_policy_state),
                            source.get("impostor_state", {}), "impostor_state")
    return impostors_lib.ImpostorSet(*merged), state

  def abstract_state(self) -> train_state_lib.TrainState:
    """The state's shapes and dtypes with M impostor rows (unpadded: `self.layout`
    pads them); nothing is computed."""
    v = self._abstract_variables
    return train_state_lib.abstract(
        params=v["params"], batch_stats=v.get("batch_stats", {}),
        impostors=self._abstract_impostors,
        loss_state=jax.eval_shape(self._loss_state),
        impostor_state=self._abstract_policy_state, tx=self.tx,
        train_centers=self.policy.trainable)

  def make_update(self):
    # The state keeps its layout through the step (impostor rows stay split).
    return xla_cpu.jit(update_lib.make_update(self.network, self.objective, self.tx,
                                              frozen=self.frozen, forward=self.forward,
                                              seed=int(self.config.seed),
                                              policy=self.policy,
                                              impostor_learning_rate=(
                                                  optim.impostor_learning_rate(
                                                      self.config, self.total_steps))),
                       donate_argnums=(0,),
                       out_shardings=(self.layout.shardings(self.abstract_state()),
                                      parallel.replicated(self.mesh)))

  def policy_context(self) -> _PolicyContext:
    return _PolicyContext(self.outputs, self.layout, self.total_steps)

  def restore(self, manager: ocp.CheckpointManager, step: int
              ) -> train_state_lib.TrainState:
    """Checkpoint `step` of `manager` (fgjax.checkpoints.manager) as this run's state."""
    return checkpoints.restore(manager, step, self.layout, self.abstract_state())


def _train(run: Run, state, manager: ocp.CheckpointManager,
           writer: metric_writer.MetricWriter) -> train_state_lib.TrainState:
  """Steps from state.step to run.total_steps; checkpoints and logs as it goes."""
  config = run.config
  update = run.make_update()
  context = run.policy_context()
  step = int(state.step)
  batches = run.outputs.train_batches(step)
  log_every = int(config.train.log_every_steps)
  t_log, step_log = time.time(), step
  while step < run.total_steps:
    batch = parallel.global_batch(next(batches), run.mesh)
    state, metrics = update(state, batch)
    step += 1
    state = run.policy.after_step(state, step, context)
    logs = step % log_every == 0 or step == run.total_steps
    if logs or manager.should_save(step):
      host = parallel.to_host(metrics)
      divergence.check(host, step, max_embedding_norm=float(
          config.train.max_embedding_norm), last_good_step=manager.latest_step(),
          checkpoint_dir=str(manager.directory),
          learning_rate=float(config.optim.learning_rate))
    if logs:
      now = time.time()
      rate = (step - step_log) / max(now - t_log, 1e-9)
      host["steps_per_sec"] = rate
      host["images_per_sec"] = rate * config.train.batch_size
      writer.write_scalars(step, host)
      logging.info("step %d/%d loss %.4f  %.2f step/s  ETA %.0fs", step,
                   run.total_steps, float(host["loss"]), rate,
                   (run.total_steps - step) / max(rate, 1e-9))
      t_log, step_log = now, step
    manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  if manager.latest_step() != step:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
  return state


def _restore_or_create(run: Run, manager: ocp.CheckpointManager, workdir: str):
  latest = manager.latest_step()
  if latest is None:
    return run.initial_state()
  state = run.restore(manager, latest)
  workdir_lib.truncate_metrics(workdir, latest)
  logging.info("Resumed from %s at step %d.", workdir, latest)
  return state


def _compressed_impostors(run: Run, state, imps: Optional[impostors_lib.ImpostorSet]
                          ) -> tuple[Optional[impostors_lib.ImpostorSet], dict[str, Any],
                                     tuple]:
  """Host impostors (decoded from PQ codes when configured), memory, (pq, codes)."""
  memory = {"network_params_bytes": int(sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params["net"])))}
  if imps is None:
    return None, memory, (None, None)
  memory["impostors_float32_bytes"] = int(imps.centers.size * 4)
  if not run.config.impostors.pq_bytes:
    return imps, memory, (None, None)
  pq, codes, when = impostor_policies.compress(
      imps, parallel.to_host(state.impostor_state), run.config)
  memory["pq"] = quantize.nbytes(pq, codes)
  memory["pq_applied"] = when
  return imps._replace(centers=np.asarray(quantize.decode(pq, codes))), memory, (pq, codes)


def _evaluate(run: Run, state, workdir: str,
              host_impostors: Optional[impostors_lib.ImpostorSet]
              ) -> tuple[dict[str, Any], tuple]:
  imps, memory, quantized = _compressed_impostors(run, state, host_impostors)
  keys = ("embedding", "logits") if run.network.has_logits else ("embedding",)
  keys += run.extra_logits
  variables = state.variables()
  outputs = {s: run.outputs.outputs(variables, s, keys) for s in ("val", "test")
             if run.outputs.has(s)}
  nca = run.config.loss.get("nca")
  results = evaluate_run.evaluate_splits(
      outputs, impostors=imps, num_classes=run.num_classes, eval_config=run.config.eval,
      default_sigma=float(nca.sigma) if nca is not None else 1.0,
      extra_logits=run.extra_logits,
      predictions_file=(os.path.join(workdir, PREDICTIONS_FILE)
                        if jax.process_index() == 0 else None))
  if "pq_applied" in memory:
    results["pq_applied"] = memory.pop("pq_applied")
  results["memory"] = memory
  if run.outputs.has("unknown") and "test" in outputs:
    results["openset"] = evaluate_run.openset(
        outputs["test"], run.outputs.outputs(variables, "unknown", keys), impostors=imps,
        sigma=results["sigma"], num_classes=run.num_classes,
        workdir=workdir if jax.process_index() == 0 else None,
        title=run.resolved.scheme)
  if "test" in results["splits"] and jax.process_index() == 0:
    try:
      visualize.reliability_diagram(
          os.path.join(workdir, "reliability.png"),
          results["splits"]["test"]["calibration"], title=f"{run.resolved.scheme}, test")
      # Relative to the workdir: results.json stays the same wherever the run lives.
      results["reliability_picture"] = "reliability.png"
    except ImportError as e:  # The numbers stay; only the picture needs matplotlib.
      results["reliability_picture"] = f"not drawn: {e}"
  if "attention" in run.output_shapes and jax.process_index() == 0:  # BAP networks
    results["attention_picture"] = bap.attention_pictures(run, variables, workdir)
  if run.config.eval.localization and run.outputs.has("test"):
    results["localization"] = _localization(run, variables, workdir)
  if run.config.eval.get("rbf_svm"):  # The impostor paper's baseline (section 4).
    from fgjax import rbf_svm  # pylint: disable=g-import-not-at-top
    results["rbf_svm"] = rbf_svm.for_run(
        run, variables, workdir if jax.process_index() == 0 else None)
  results["num_classes"] = run.num_classes
  results["num_impostors"] = None if imps is None else int(imps.centers.shape[0])
  return results, quantized


def _localization(run: Run, variables, workdir: str) -> dict[str, Any]:
  """ELoPE Table 4 on the test split, and a picture of the first 16 test images."""
  keys = tuple(k for k in ("box", "heatmap", "heatmap_target", "mean_map")
               if k in run.output_shapes)
  out = run.outputs.outputs(variables, "test", keys, from_images=True)
  tau = float(run.config.model.localizer_tau)
  report = evaluate_run.localization(out, tau=tau)
  if jax.process_index() != 0:
    return report
  sample = run.outputs.images("test", 16)
  n = len(sample["label"])
  heat = out["heatmap"] if "heatmap" in out else out["mean_map"]
  boxes = out["box"] if "box" in out else np.asarray(
      localize.heatmap_boxes(jnp.asarray(heat[:n]), tau))
  try:
    report["picture"] = visualize.heatmap_grid(
        os.path.join(workdir, "localization.png"),
        visualize.to_uint8(sample["image"], run.network.spec.mean,
                           run.network.spec.std),
        heat[:n], boxes[:n], sample.get("true_box"),
        [run.splits.class_names[c] for c in sample["label"]])
  except ImportError as e:  # The numbers stay; only the picture needs matplotlib.
    report["picture"] = f"not drawn: {e}"
  return report


def _int8_calibration(run: Run, variables, has_impostors: bool
                      ) -> Optional[dict[str, Any]]:
  """What the artifact keeps for engine='onnx-int8' (config.export): the ranges from
  the run's own training images, or why the engine refuses this network. A refusal
  is recorded, never raised: the trained network and its results are still exported."""
  export_config = run.config.get("export") or {}
  count = int(export_config.get("int8_calibration_images", 0))
  if not count:
    return None
  float_ops = tuple(export_config.get("int8_float_ops", ()))
  from fgjax import export  # pylint: disable=g-import-not-at-top
  images = run.outputs.images("train", count, spread=True)["image"]
  try:
    calibration = export.calibrate_int8(
        run.network.module, variables, images=images,
        outputs=artifact.served_outputs(has_impostors),
        bn_epsilon=run.network.spec.bn_epsilon, float_ops=float_ops)
  except (export.Int8Error, export.OnnxExportError, ImportError) as e:
    logging.warning("No int8 engine in the artifact: %s", e)
    return {"refused": str(e)}
  return {"calibration": calibration, "images": int(len(images)),
          "float_ops": list(float_ops)}


def _git_commit() -> Optional[str]:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          timeout=5).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains per `config`, checkpointing into `workdir`, then evaluates.

  A run killed at any moment resumes from the latest checkpoint in `workdir` and ends
  with the same number of steps. A workdir that belongs to an incompatible config is
  refused before anything is written (fgjax.workdir). Returns the results also written
  to `<workdir>/results.json`.
  """
  start_time = time.time()
  if config.get("distributed"):
    parallel.initialize_distributed(config)
  workdir_lib.check_config(workdir, config.to_dict())
  run = Run(config)
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
    # What fgjax.predict and a resumed run compare against.
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                           config.to_dict())
    workdir_lib.write_json(os.path.join(workdir, "class_names.json"),
                           list(run.splits.class_names))
  manager = checkpoints.manager(workdir, config, run.total_steps)
  state = _restore_or_create(run, manager, workdir)
  writer = metric_writer.MetricWriter(workdir)
  try:
    state = _train(run, state, manager, writer)
  finally:
    # Waits for the async saves in flight: a crash (or a divergence stop) keeps every
    # checkpoint it had started, instead of leaving a half-written step behind.
    manager.close()
  train_seconds = time.time() - start_time

  # On every process: gathering impostor rows split over hosts is a collective.
  host_impostors = None if state.impostors is None else impostors_lib.present(
      parallel.to_host(state.impostors))
  results, quantized = _evaluate(run, state, workdir, host_impostors)
  scale = state.impostor_state.get("scale")
  results.update({
      "config": config.to_dict(),
      "scheme": {**run.resolved.describe(), "loss": run.objective.describe()},
      "steps": int(state.step), "steps_per_epoch": run.steps_per_epoch,
      "wall_seconds": time.time() - start_time, "train_seconds": train_seconds,
      "num_devices": run.mesh.devices.size, "commit": _git_commit(),
      # Files left out when the data source was built ('path: error'), so a results
      # table can say what it was computed without.
      "dropped_files": list(run.splits.train.bad_files),
      "impostor_scale": None if scale is None else float(parallel.to_host(scale))})
  early_exit = None
  if (config.get("early_exit") or {}).get("exits"):
    from fgjax.early_exit import training as early_exit_lib  # pylint: disable=g-import-not-at-top
    results["early_exit"], early_exit = early_exit_lib.fit_for_run(run, state.variables())
  if is_writer:
    int8 = _int8_calibration(run, state.variables(), state.impostors is not None)
    if int8 is not None:
      results["int8"] = {k: v for k, v in int8.items() if k != "calibration"}
    artifact.export(
        os.path.join(workdir, "artifact"), config=config, network=run.network,
        class_names=list(run.splits.class_names), variables=state.variables(),
        impostors=host_impostors,
        sigma=results["sigma"], quantized=quantized, int8=int8, early_exit=early_exit)
    # Last: results.json marks a finished run (benchmarks skip such workdirs), so it
    # must not exist before the artifact does.
    workdir_lib.write_json(os.path.join(workdir, "results.json"), results)
  # TensorBoard only: metrics.jsonl is the training log, one row per logged step.
  writer.write_scalars(int(state.step), evaluate_run.flat_scalars(results), jsonl=False)
  writer.close()
  return results
