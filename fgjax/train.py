"""train_and_evaluate: one training loop for all five schemes, with resume.

Data flow (DESIGN.md): data sources -> input pipeline -> backbone + heads -> impostor
initialisation (protocol steps 2-3) -> jitted update over a sharded batch -> orbax
checkpoints -> evaluation with the RBF rule (eq. 3) and/or the softmax head
(fgjax.evaluate_run) -> results.json and the exported artifact.

The training state is one pytree,
  {'step', 'params': {'net': flax params, 'impostors': ImpostorSet},
   'batch_stats', 'opt_state', 'class_means' (only with config.aux_loss)},
replicated over a 1-D device mesh while batches are split along it. The optimiser sees
only the float leaves {'net', 'centers'}; impostor labels are data, not parameters, and
the class means of an auxiliary loss follow their own online rule (schemes.AuxLoss).
"""

import json
import os
import subprocess
import time
from typing import Any, Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from fgjax import artifact
from fgjax import config_checks
from fgjax import data
from fgjax import evaluate
from fgjax import evaluate_run
from fgjax import feature_cache
from fgjax import impostors as impostors_lib
from fgjax import metric_writer
from fgjax import models
from fgjax import optim
from fgjax import parallel
from fgjax import quantize
from fgjax import schemes
from fgjax.models import heads
from fgjax.models import xla_cpu

State = dict[str, Any]


def build_network(config, num_classes: int, scheme: schemes.Scheme):
  """The backbone spec from the registry and the ImpostorNet around it."""
  spec = models.get(config.model.backbone, pretrained=config.model.pretrained,
                    weights_path=config.model.get("weights_path") or None)
  net = heads.ImpostorNet(backbone=spec.module, embed_dim=scheme.embed_dim,
                          num_classes=num_classes if scheme.has_classifier else None)
  return spec, net


def init_variables(net: heads.ImpostorNet, spec, config) -> dict[str, Any]:
  """Random heads (protocol step 1) on top of the backbone's (pretrained) variables."""
  size = config.input.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(lambda r: net.init(r, dummy, train=False))(
      jax.random.key(config.seed))
  variables = jax.tree.map(lambda x: x, dict(variables))  # Mutable copy.
  params = dict(variables["params"])
  params["backbone"] = spec.variables["params"]
  out = {"params": params}
  if "batch_stats" in variables or "batch_stats" in spec.variables:
    stats = dict(variables.get("batch_stats", {}))
    if "batch_stats" in spec.variables:
      stats["backbone"] = spec.variables["batch_stats"]
    out["batch_stats"] = stats
  return out


def trainable_tree(state: State) -> dict[str, Any]:
  """The float leaves the optimiser updates: network params and impostor centers.

  Not state['class_means']: the aux loss moves them with its own update rule.
  """
  tree = {"net": state["params"]["net"]}
  if state["params"].get("impostors") is not None:
    tree["centers"] = state["params"]["impostors"].centers
  return tree


def _frozen_stages(config, spec) -> frozenset[str]:
  mode, n = config_checks.parse_trainable(config.model.trainable)
  if mode == "all":
    return frozenset()
  if mode == "head":
    return frozenset({"*"})
  if n > len(spec.stage_names):
    raise ValueError(f"config.model.trainable='last:{n}' but {spec.name} has only "
                     f"{len(spec.stage_names)} stages: {list(spec.stage_names)}.")
  return frozenset(spec.stage_names[:-n])


def make_update_fn(net: heads.ImpostorNet, scheme: schemes.Scheme,
                   tx: optax.GradientTransformation, sigma: float,
                   backbone_train: bool, from_features: bool,
                   aux: Optional[schemes.AuxLoss] = None,
                   frozen_stages: frozenset[str] = frozenset()):
  """The one update function: loss per scheme, gradients, optimiser step.

  With `aux`, the loss is the scheme's + aux.weight * aux loss on the embedding
  against state['class_means'] (C, E), which the step replaces by their update.
  """

  def update(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
    labels_of_impostors = (state["params"]["impostors"].labels
                           if scheme.uses_impostors else None)

    def loss_fn(trainable):
      variables = {"params": _stop_frozen(trainable["net"], frozen_stages)}
      if state["batch_stats"]:
        variables["batch_stats"] = state["batch_stats"]
      if from_features:
        outputs = net.apply(variables, batch["image"], method=heads.ImpostorNet.heads)
        new_stats = state["batch_stats"]
      elif backbone_train and state["batch_stats"]:
        outputs, mutated = net.apply(variables, batch["image"], train=True,
                                     backbone_train=True, mutable=["batch_stats"])
        new_stats = mutated["batch_stats"]
      else:
        outputs = net.apply(variables, batch["image"], train=True,
                            backbone_train=False)
        new_stats = state["batch_stats"]
      imps = None
      if scheme.uses_impostors:
        imps = impostors_lib.ImpostorSet(trainable["centers"], labels_of_impostors)
      loss, metrics = schemes.loss_and_metrics(scheme, outputs, batch, imps, sigma)
      new_means = None
      if aux is not None:
        aux_loss, new_means = schemes.aux_loss_and_means(
            aux, outputs["embedding"], batch, state["class_means"])
        metrics["aux_loss"] = aux_loss
        loss = loss + aux.weight * aux_loss
        metrics["loss"] = loss
      return loss, (metrics, new_stats, new_means)

    trainable = trainable_tree(state)
    grads, (metrics, new_stats, new_means) = jax.grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    params = {"net": trainable["net"], "impostors": state["params"]["impostors"]}
    if scheme.uses_impostors:
      params["impostors"] = impostors_lib.ImpostorSet(trainable["centers"],
                                                      labels_of_impostors)
    new_state = {**state, "step": state["step"] + 1, "params": params,
                 "batch_stats": new_stats, "opt_state": opt_state}
    if aux is not None:
      new_state["class_means"] = new_means
    return new_state, metrics

  return update


def _stop_frozen(net_params: dict[str, Any], frozen_stages: frozenset[str]):
  """Frozen backbone stages as constants of the loss.

  The optimiser masks their updates anyway; stopping the gradient here also spares
  the backward pass through them (with 'last:3' of Lite0 that is most of the step).
  """
  if not frozen_stages or "backbone" not in net_params:
    return net_params
  backbone = {name: (jax.lax.stop_gradient(p) if "*" in frozen_stages
                     or name in frozen_stages else p)
              for name, p in net_params["backbone"].items()}
  return {**net_params, "backbone": backbone}


def _git_commit() -> Optional[str]:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          timeout=5).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


class Trainer:
  """Holds what one run needs; `train_and_evaluate` drives it."""

  def __init__(self, config, workdir: str):
    config_checks.validate(config)
    self.config, self.workdir = config, workdir
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
    self.scheme = schemes.get(config)
    self.aux = schemes.get_aux_loss(config)
    self.spec, self.net = build_network(config, self.num_classes, self.scheme)
    mode, _ = config_checks.parse_trainable(config.model.trainable)
    self.backbone_train = mode == "all"
    self.from_features = bool(config.train.cache_features)
    self.steps_per_epoch = data.steps_per_epoch(self.splits.train, config.train.batch_size)
    if self.steps_per_epoch < 1:
      raise ValueError(f"config.train.batch_size={config.train.batch_size} is larger than "
                       f"the training split ({len(self.splits.train)} images).")
    self.total_steps = (int(config.train.num_steps) if config.train.get("num_steps")
                        else int(config.train.num_epochs) * self.steps_per_epoch)
    variables = init_variables(self.net, self.spec, config)
    self.frozen = _frozen_stages(config, self.spec)
    self._variables0 = variables
    repl = parallel.replicated(self.mesh)
    self._forward = xla_cpu.jit(
        lambda v, x: self.net.apply(v, x, train=False), out_shardings=repl)
    self._heads = jax.jit(
        lambda v, f: self.net.apply(v, f, method=heads.ImpostorNet.heads),
        out_shardings=repl)

  # ---- data -------------------------------------------------------------------------
  def _iterator(self, source, train: bool, start_step: int = 0) -> Iterator[dict]:
    c = self.config
    return data.make_iterator(
        source, batch_size=c.train.batch_size if train else c.eval.batch_size,
        train=train, seed=c.seed, image_size=c.input.image_size,
        resize_size=c.input.resize_size, mean=self.spec.mean, std=self.spec.std,
        start_step=start_step, worker_count=c.input.worker_count,
        flip=c.input.flip)

  def outputs(self, variables, source) -> dict[str, np.ndarray]:
    """Network outputs for every example of `source` (eval transforms)."""
    return evaluate.collect_outputs(self._forward, variables,
                                    self._iterator(source, train=False), self.mesh)

  def split_outputs(self, variables, split: str) -> dict[str, np.ndarray]:
    """Outputs for split 'train' | 'val' | 'test' | 'unknown', in index order.

    With a frozen backbone on cached features only the heads run: the same numbers
    as `outputs` (the backbone's BatchNorm uses running statistics in both).
    """
    if not self.from_features:
      return self.outputs(variables, getattr(self.splits, split))
    cached = self.split_features(split)
    out = {k: np.asarray(v) for k, v in
           self._heads(variables, jnp.asarray(cached["features"])).items()}
    out.update(label=cached["label"], index=cached["index"])
    return out

  def split_features(self, split: str) -> dict[str, np.ndarray]:
    """Frozen-backbone features of a split, once per run (and per cache directory)."""
    memo = self.__dict__.setdefault("_split_features", {})
    if split not in memo:
      source = getattr(self.splits, split)

      def compute():
        out = self.outputs(self._variables0, source)
        order = np.argsort(out["index"])
        return {k: out[k][order] for k in ("features", "label", "index")}

      key = feature_cache.fingerprint(self.config, split, source,
                                      self.config.model.get("weights_path") or None)
      memo[split] = feature_cache.load_or_compute(
          self.config.train.get("feature_cache_dir", ""), key, compute,
          write=jax.process_index() == 0)
    return memo[split]

  # ---- state ------------------------------------------------------------------------
  def _impostors_from(self, variables) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every training image, ordered by index (protocol step 2)."""
    out = self.split_outputs(variables, "train")  # Heads only on cached features.
    m = len(self.splits.train)
    order = np.argsort(out["index"])
    if not np.array_equal(out["index"][order], np.arange(m)):
      raise RuntimeError("impostor pass did not see every training image exactly once.")
    return out["embedding"][order], out["label"][order]

  def train_features(self) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (M, F) and labels of the training images, computed once."""
    cached = self.split_features("train")
    return cached["features"], cached["label"]

  def initial_state(self, with_impostors: bool) -> State:
    variables = self._variables0
    params = {"net": variables["params"], "impostors": None}
    if self.scheme.uses_impostors:
      if with_impostors:
        emb, labels = self._impostors_from(variables)
        imps, scale = impostors_lib.init_impostors(jnp.asarray(emb), jnp.asarray(labels))
        # Protocol step 3: the last layer shrinks by the same factor as the impostors,
        # so embeddings and impostors stay on one scale.
        net = dict(params["net"])
        embed = dict(net[heads.EMBED_LAYER])
        embed = {k: v / scale for k, v in embed.items()}
        net[heads.EMBED_LAYER] = embed
        params["net"] = net
        self.impostor_scale = float(scale)
        if self.compress_before_training:
          # Paper, "Impostors compression": compress the initial impostors with OPQ
          # and train the fixed scheme against the decoded, lossy impostors.
          pq = self.train_quantizer(imps.centers)
          imps = imps._replace(centers=quantize.reconstruct(pq, imps.centers))
        params["impostors"] = imps
      else:  # Shapes only: a checkpoint restore fills the values.
        m, e = len(self.splits.train), self.scheme.embed_dim
        params["impostors"] = impostors_lib.ImpostorSet(
            jnp.zeros((m, e), jnp.float32), jnp.zeros((m,), jnp.int32))
        if self.compress_before_training:
          nsub = int(self.config.impostors.pq_bytes)
          pq = quantize.ProductQuantizer(
              jnp.zeros((nsub, 256, e // nsub), jnp.float32), jnp.zeros((e, e), jnp.float32))
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "batch_stats": variables.get("batch_stats", {})}
    if self.compress_before_training:
      # A plain dict: orbax restores it into the same structure it saved.
      state["pq"] = pq._asdict()
    if self.aux is not None:
      # Zeros, also with_impostors=True (ELoPE does not say how it initialises): no
      # pass over the training set, and one structure for init and restore. The online
      # update (eq. 6) pulls a class's mean to its features within a few of its batches:
      # its weight on the zero start shrinks by (1 - alpha N_c / (1 + N_c)) per batch.
      state["class_means"] = jnp.zeros((self.num_classes, self.embedding_width),
                                       jnp.float32)
    labels = optim.trainable_labels(trainable_tree(state),
                                    train_impostors=self.scheme.train_impostors,
                                    frozen_backbone_stages=self.frozen)
    self.tx = optim.make_optimizer(self.config, labels, self.total_steps)
    state["opt_state"] = self.tx.init(trainable_tree(state))
    return parallel.replicate(state, self.mesh)

  @property
  def embedding_width(self) -> int:
    """E of outputs['embedding']: d_em, or the backbone's feature width for 'ce'."""
    if self.scheme.embed_dim is not None:
      return int(self.scheme.embed_dim)
    return int(self.spec.feature_dim)

  @property
  def compress_before_training(self) -> bool:
    return bool(self.config.impostors.pq_bytes) and self.scheme.name == "fixed"

  def train_quantizer(self, centers) -> quantize.ProductQuantizer:
    """OPQ (or PQ) codebooks with `pq_bytes` one-byte codes per impostor."""
    c = self.config.impostors
    fn = quantize.train_opq if c.pq_opq else quantize.train_pq
    return fn(jnp.asarray(centers), int(c.pq_bytes), seed=self.config.seed)

  def reset_impostors(self, state: State) -> State:
    """Tied scheme: impostors := current embeddings of the training images (eq. 5)."""
    variables = {"params": state["params"]["net"], "batch_stats": state["batch_stats"]}
    emb, labels = self._impostors_from(variables)
    params = dict(state["params"])
    params["impostors"] = impostors_lib.ImpostorSet(jnp.asarray(emb),
                                                    jnp.asarray(labels, jnp.int32))
    return parallel.replicate({**state, "params": params}, self.mesh)

  # ---- feature cache (head-only training on a CPU budget) -----------------------------
  def _cached_feature_batches(self, start_step: int) -> Iterator[dict]:
    """Training batches of cached features in a seeded per-epoch order (resumable)."""
    features, labels = self.train_features()
    bs, m = self.config.train.batch_size, len(labels)
    step = start_step
    while True:
      epoch, k = divmod(step, self.steps_per_epoch)
      perm = np.random.default_rng([self.config.seed, epoch]).permutation(m)
      idx = perm[k * bs:(k + 1) * bs]
      yield {"image": features[idx], "label": labels[idx].astype(np.int32),
             "index": idx.astype(np.int32), "valid": np.ones(len(idx), bool)}
      step += 1


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains per `config`, checkpointing into `workdir`, then evaluates.

  A run killed at any moment resumes from the latest checkpoint in `workdir` and ends
  with the same number of steps. Returns the results also written to
  `<workdir>/results.json`.
  """
  start_time = time.time()
  if config.get("distributed"):
    jax.distributed.initialize()
  trainer = Trainer(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    # What fgjax.predict needs to rebuild the network without the dataset.
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    _write_json(os.path.join(workdir, "class_names.json"),
                list(trainer.splits.class_names))
  writer = metric_writer.MetricWriter(workdir)
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=2, save_interval_steps=max(int(config.train.checkpoint_every_steps),
                                                 1) if config.train.checkpoint_every_steps
          else trainer.total_steps + 1))
  if trainer.from_features:
    # Before any state exists: the update donates buffers it shares with the
    # initial variables, which the backbone pass reads.
    for split in ("train", "val", "test", "unknown"):
      source = getattr(trainer.splits, split)
      if source is not None and len(source):
        trainer.split_features(split)
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            trainer.initial_state(with_impostors=False))
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    state = parallel.replicate(state, trainer.mesh)
    logging.info("Resumed from %s at step %d.", workdir, latest)
  else:
    state = trainer.initial_state(with_impostors=True)
  step = int(state["step"])

  update = xla_cpu.jit(make_update_fn(trainer.net, trainer.scheme, trainer.tx,
                                      float(config.impostors.sigma),
                                      trainer.backbone_train, trainer.from_features,
                                      trainer.aux, trainer.frozen),
                       donate_argnums=(0,))
  batches = (trainer._cached_feature_batches(step) if trainer.from_features
             else trainer._iterator(trainer.splits.train, train=True, start_step=step))
  reset_period = trainer.scheme.reset_every_epochs * trainer.steps_per_epoch
  log_every = int(config.train.log_every_steps)
  t_log, step_log = time.time(), step
  metrics = {}
  while step < trainer.total_steps:
    batch = parallel.global_batch(next(batches), trainer.mesh)
    state, metrics = update(state, batch)
    step += 1
    if reset_period and step % reset_period == 0 and step < trainer.total_steps:
      state = trainer.reset_impostors(state)
      logging.info("Step %d: tied impostors reset to the current embeddings.", step)
    if step % log_every == 0 or step == trainer.total_steps:
      host = parallel.to_host(metrics)
      now = time.time()
      rate = (step - step_log) / max(now - t_log, 1e-9)
      eta = (trainer.total_steps - step) / max(rate, 1e-9)
      host["steps_per_sec"] = rate
      host["images_per_sec"] = rate * config.train.batch_size
      writer.write_scalars(step, host)
      logging.info("step %d/%d loss %.4f  %.2f step/s  ETA %.0fs", step,
                   trainer.total_steps, float(host["loss"]), rate, eta)
      t_log, step_log = now, step
    manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  if manager.latest_step() != step:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
  train_seconds = time.time() - start_time

  results, quantized = evaluate_run.evaluate_state(trainer, state)
  results.update({
      "config": config.to_dict(), "scheme": schemes.describe(trainer.scheme),
      "steps": step, "steps_per_epoch": trainer.steps_per_epoch,
      "wall_seconds": time.time() - start_time, "train_seconds": train_seconds,
      "num_devices": trainer.mesh.devices.size, "commit": _git_commit(),
      "impostor_scale": getattr(trainer, "impostor_scale", None)})
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "results.json"), results)
    imps = state["params"]["impostors"]
    artifact.export(
        os.path.join(workdir, "artifact"), config=config,
        class_names=list(trainer.splits.class_names),
        variables={"params": state["params"]["net"], "batch_stats": state["batch_stats"]},
        impostors=None if imps is None else parallel.to_host(imps),
        sigma=results["sigma"], spec=trainer.spec, scheme=trainer.scheme,
        quantized=quantized)
  writer.write_scalars(step, evaluate_run.flat_scalars(results))
  writer.close()
  manager.close()
  return results


def _write_json(path: str, obj: Any) -> None:
  """Writes atomically, so a crash never leaves a half-written file behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.generic,)):
    return o.item()
  if isinstance(o, (np.ndarray, jax.Array)):
    return np.asarray(o).tolist()
  return str(o)
