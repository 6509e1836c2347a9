"""Class-incremental continual learning with impostors: NNGK review Algorithm 1.

Chervontsev, "Deep Metric Learning and Image Classification with Nearest Neighbour
Gaussian Kernels", section 4 (a proposal without results), on the loose impostor
network of Lebedev et al. (eq. 6). The protocol, with every choice the review leaves
open marked [choice]:

Tasks. The C classes are cut, in class-index order, into config.continual.tasks
groups of equal size [choice: contiguous, no shuffling] (digits: 5 tasks of 2 classes;
cars196: 4 of 49). Task e trains only on the training images of its classes; after
it, the model is tested on the test images of every class seen so far, predicting
among the seen classes only (class-incremental: no task identity at test time).

Methods (`METHODS`), each over the same tasks, epochs and optimiser:
  softmax   a ConvNet (config.model.backbone + a C-way softmax head) fine-tuned with
            cross-entropy on each task in turn: the catastrophic-forgetting baseline.
            Learning rate config.continual.softmax_learning_rate.
  loose     the loose impostor net without add/drop: at the start of task e the
            task's training images join the centers as their current embeddings
            f_theta(x_i) [choice: the review's "C <- {f_theta0(x_i)}" applied per task;
            the first task's centers and embedding layer are divided by their mean norm,
            impostor paper protocol step 3, later ones are not rescaled]; trained with
            the NCA loss (own centers bypassed) plus lambda * attachment of each image
            to its own center (eq. 6); old centers stay, and stay trainable.
  add_drop  `loose` plus Algorithm 1: after n_t = config.continual.train_epochs epochs
            the model is frozen; S_d = the n_d = config.continual.num_drop centers best
            predicted by the others (leave-one-out posterior of their own soft label,
            at the training sigma [choice]; never a class's last center; any task's
            centers [as in the review: "from C"]); S_a = the n_a =
            config.continual.num_add current-task images whose current embedding is
            worst predicted by the centers, own centers bypassed [choice: "D_e \\ C"
            read as the current embeddings, which are no center once training has moved
            them]. S_d are dropped one by one, then S_a added one by one at their
            embeddings with one-hot labels (owned by their image, bypassed by it in the
            loss, not attached), each redistributing the labels of its
            config.continual.neighbours nearest centers by eq. (13) [choice: the same
            formula for drops and adds, as "Same with S_a" says; it keeps labels
            distributions]. Then n_f = config.continual.finetune_epochs more epochs.
The impostor methods train with soft labels: fgjax.losses.soft_nca (loss and rule).
`loose` and `softmax` also train n_t + n_f epochs per task. One Adam state (the
project's, fgjax.optim; constant learning rate) runs through all phases and tasks
[choice]: the moments of a dropped center go with it, a new center's start at zero.

Evaluation after each task: the RBF rule's sigma is chosen on the validation images
of the seen classes from config.eval.sigma_grid (top-1, ties to the larger sigma);
test top-1 over all test images of the seen classes ("average accuracy") and per
task. Forgetting (`forgetting`, Chaudhry et al. 2018): the mean over tasks k < E of
the best accuracy on task k after any task t in [k, E) minus its accuracy at the end.

`run_protocol` writes <workdir>/<method>/task<e>.json and the learner's state
(state<e>.msgpack) after each task; a finished task is not rerun.
"""

import os
from typing import Any, Callable, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fgjax import impostor_selection as selection
from fgjax import impostors as impostors_lib
from fgjax import losses
from fgjax import optim
from fgjax import workdir as workdir_lib
from fgjax.losses import soft_nca
from fgjax.models import nets


def task_classes(num_classes: int, num_tasks: int) -> list[np.ndarray]:
  """The classes of each task: `num_tasks` contiguous groups of equal size."""
  if num_tasks < 1 or num_classes % num_tasks:
    raise ValueError(f"config.continual.tasks={num_tasks} must divide the {num_classes} "
                     "classes into groups of equal size.")
  return list(np.arange(num_classes).reshape(num_tasks, -1))


def _take(x, rows):
  return jax.tree.map(lambda a: a[rows], x)


class Split:
  """One split's inputs (images (N, H, W, 3), or a dict of cached backbone outputs),
  labels (N,) and ids (N,) (index in the split: the training image's own id)."""

  def __init__(self, inputs, labels, ids):
    self.inputs, self.labels, self.ids = inputs, np.asarray(labels), np.asarray(ids)

  def of_classes(self, classes) -> "Split":
    rows = np.flatnonzero(np.isin(self.labels, classes))
    return Split(_take(self.inputs, rows), self.labels[rows], self.ids[rows])


def load_splits(run) -> dict[str, Split]:
  """train / val / test of a `fgjax.train.Run`: cached backbone features for head-only
  runs (config.train.cache_features), else the evaluation-transformed images."""
  out = {}
  for split in ("train", "val", "test"):
    if run.outputs.cache_features:
      f = run.outputs.backbone_features(split)
      inputs = {k: f[k] for k in run.network.reads}
    else:
      f = run.outputs.images(split, len(run.outputs.source(split)))
      inputs = f["image"]
    out[split] = Split(inputs, f["label"], f["index"])
  return out


def _apply(network, variables, x, train: bool, cached: bool):
  """(outputs, new batch_stats): the head on cached features, or the whole network."""
  if cached:
    return network.head_apply(variables, x, train=train), variables.get(
        "batch_stats", {})
  module = network.module
  if train and variables.get("batch_stats"):
    out, mutated = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]
  return module.apply(variables, x, train=False), variables.get("batch_stats", {})


class Learner:
  """Base: a network trained task after task (subclasses: the loss and the rule)."""
  net = ""

  def __init__(self, run, config, num_classes: int, learning_rate: float):
    self.config, self.num_classes = config, num_classes
    self.cached = bool(config.train.cache_features)
    if self.net == run.network.name:
      self.network, self.variables = run.network, run.initial_variables()
    else:
      self.network = nets.build(config.model, num_classes, net=self.net,
                                cached_tail=optim.cached_tail(config))
      self.variables = self.network.init(config.seed, config.input.image_size)
    self.frozen = optim.frozen_paths(config.model.trainable, self.network.spec.blocks)
    if config.optim.schedule != "constant":
      raise ValueError(f"config.optim.schedule={config.optim.schedule!r}: the continual "
                       "protocol runs one optimiser across tasks; use 'constant'.")
    self.optim_config = ml_collections.ConfigDict(config.to_dict())
    self.optim_config.optim.learning_rate = float(learning_rate)
    self.opt_state = None
    self._embed = jax.jit(lambda v, x, key: _apply(self.network, v, x, False,
                                                   self.cached)[0][key],
                          static_argnums=2)

  def outputs(self, x, key: str, batch: int = 512) -> np.ndarray:
    n = len(jax.tree.leaves(x)[0])
    return np.concatenate([np.asarray(self._embed(self.variables,
                                                  _take(x, slice(s, s + batch)), key))
                           for s in range(0, n, batch)])

  # Hooks of the protocol; the base learner has no center set.
  def start_task(self, task: Split) -> None:
    del task

  def after_train(self, task: Split) -> dict[str, Any]:
    del task
    return {}

  def trainable(self) -> dict[str, Any]:
    return {"net": self.variables["params"]}

  def set_trainable(self, trainable) -> None:
    self.variables = {**self.variables, "params": trainable["net"]}

  def loss_fn(self) -> Callable:
    """(trainable, batch_stats, x, labels, ids, consts) -> (mean loss, batch_stats)."""
    raise NotImplementedError

  def phase_constants(self, task: Split) -> dict[str, jax.Array]:
    """Arrays the loss reads that stay fixed during a training phase on `task`."""
    del task
    return {}

  def log_probs(self, x, seen: np.ndarray, sigma: Optional[float]) -> np.ndarray:
    raise NotImplementedError

  def sigmas(self) -> list[Optional[float]]:
    return [None]

  def state(self) -> dict[str, Any]:
    state = {"variables": self.variables}
    if self.opt_state is not None:
      state["opt_state"] = flax.serialization.to_state_dict(self.opt_state)
    return state

  def restore(self, state: dict[str, Any]) -> None:
    """The learner of `state` (call after the subclass restored its center set)."""
    self.variables = state["variables"]
    if "opt_state" in state:
      self.opt_state = flax.serialization.from_state_dict(
          self._tx().init(self.trainable()), state["opt_state"])

  def _tx(self) -> optax.GradientTransformation:
    """The project's Adam (fgjax.optim), impostor centers as an 'impostors' group."""
    labels = optim.trainable_labels(self.trainable(), train_impostors=True,
                                    frozen=self.frozen)
    return optim.make_optimizer(self.optim_config, labels, total_steps=1)

  def train(self, task: Split, epochs: int, seed: tuple[int, ...]) -> float:
    """`epochs` epochs over `task`, one Adam state across phases and tasks (restarting
    it on a converged network wrecked the digits softmax head); returns the last
    loss."""
    if epochs < 1:
      return float("nan")
    trainable = self.trainable()
    bs = int(self.config.train.batch_size)
    steps = max(len(task.labels) // bs, 1)
    tx = self._tx()
    loss_fn = self.loss_fn()

    @jax.jit
    def step(trainable, opt_state, batch_stats, x, y, ids, consts):
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          trainable, batch_stats, x, y, ids, consts)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, stats, loss

    opt_state = tx.init(trainable) if self.opt_state is None else self.opt_state
    consts = self.phase_constants(task)
    stats = self.variables.get("batch_stats", {})
    loss = jnp.nan
    for epoch in range(epochs):
      order = np.random.default_rng([*seed, epoch]).permutation(len(task.labels))
      # Last partial batch dropped [one shape per phase]; epochs reshuffle.
      for s in range(steps):
        rows = order[s * bs:(s + 1) * bs]
        trainable, opt_state, stats, loss = step(
            trainable, opt_state, stats, _take(task.inputs, rows), task.labels[rows],
            task.ids[rows], consts)
    self.set_trainable(trainable)
    self.opt_state = opt_state
    if stats:
      self.variables = {**self.variables, "batch_stats": stats}
    return float(loss)


class SoftmaxLearner(Learner):
  """Cross-entropy fine-tuning of a C-way softmax head, task after task."""
  net = "convnet"

  def loss_fn(self):
    network, cached = self.network, self.cached

    def loss(trainable, batch_stats, x, y, ids, consts):
      del ids, consts
      v = {"params": trainable["net"], "batch_stats": batch_stats}
      out, stats = _apply(network, v, x, True, cached)
      ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y)
      return ce.mean(), stats
    return loss

  def log_probs(self, x, seen, sigma):
    del sigma
    logits = self.outputs(x, "logits")
    masked = np.full_like(logits, -np.inf)
    masked[:, seen] = logits[:, seen]
    return np.asarray(jax.nn.log_softmax(jnp.asarray(masked), axis=-1))


class ImpostorLearner(Learner):
  """The loose impostor net over a growing set of soft-labelled centers (`loose`);
  with num_drop / num_add > 0 it also runs Algorithm 1's add/drop (`add_drop`)."""
  net = "impostor"
  add_drop = False

  def __init__(self, run, config, num_classes, learning_rate):
    super().__init__(run, config, num_classes, learning_rate)
    width = int(config.model.embed_dim)
    self.centers = np.zeros((0, width), np.float32)
    self.probs = np.zeros((0, num_classes), np.float32)
    self.owners = np.zeros((0,), np.int32)     # training image id of each center
    self.attached = np.zeros((0,), bool)       # its owner's loose impostor (eq. 6)
    self.sigma = float(config.loss.nca.sigma)
    self.attach_weight = float(config.loss.attachment.weight)

  def start_task(self, task):
    emb = self.outputs(task.inputs, "embedding")
    if not len(self.centers):   # Protocol step 3, once: centers and layer / mean norm.
      _, scale = impostors_lib.init_impostors(jnp.asarray(emb), jnp.asarray(task.labels))
      scale = float(scale)
      self.variables = {**self.variables, "params": self.network.scale_embedding(
          self.variables["params"], 1.0 / scale)}
      emb = emb / scale
    self._remap_moments(np.concatenate([np.arange(len(self.centers)),
                                        np.full(len(emb), -1)]))
    self.centers = np.concatenate([self.centers, emb.astype(np.float32)])
    self.probs = np.concatenate([self.probs, np.eye(self.num_classes, dtype=np.float32)[
        task.labels]])
    self.owners = np.concatenate([self.owners, task.ids.astype(np.int32)])
    self.attached = np.concatenate([self.attached, np.ones(len(task.ids), bool)])

  def after_train(self, task):
    if not self.add_drop:
      return {}
    c = self.config.continual
    posterior = selection.soft_leave_one_out_posterior(self.centers, self.probs,
                                                       self.sigma)
    kept = selection.drop_best_predicted(posterior, self.probs.argmax(1),
                                         int(c.num_drop))
    dropped = np.setdiff1d(np.arange(len(self.centers)), kept)
    dropped = dropped[np.lexsort((dropped, -posterior[dropped]))]   # drop order
    emb = self.outputs(task.inputs, "embedding")
    lp = soft_nca.soft_rbf_log_probs(emb, self.centers, self.probs, self.sigma,
                                     exclude=task.ids, center_owners=self.owners)
    own = np.exp(np.asarray(lp))[np.arange(len(emb)), task.labels]
    added = selection.add_worst_predicted(own, min(int(c.num_add), len(emb)))
    k = int(c.neighbours)
    old_task = ~np.isin(self.probs[dropped].argmax(1), task.labels)
    kept, centers, probs = selection.drop_with_redistribution(
        self.centers, self.probs, dropped, self.sigma, k)
    centers, probs = selection.add_with_redistribution(
        centers, probs, emb[added], np.eye(self.num_classes)[task.labels[added]],
        self.sigma, k)
    self._remap_moments(np.concatenate([kept, np.full(len(added), -1)]))
    self.centers, self.probs = centers.astype(np.float32), probs.astype(np.float32)
    self.owners = np.concatenate([self.owners[kept], task.ids[added].astype(np.int32)])
    self.attached = np.concatenate([self.attached[kept], np.zeros(len(added), bool)])
    return {"dropped": int(len(dropped)), "added": int(len(added)),
            "dropped_from_old_tasks": int(old_task.sum()),
            "dropped_mean_posterior": float(posterior[dropped].mean()) if len(dropped)
            else None,
            "added_mean_posterior": float(own[added].mean()) if len(added) else None}

  def _remap_moments(self, rows: np.ndarray) -> None:
    """Adam's moments of the centers follow the set: new row r holds old row rows[r],
    or zeros where rows[r] < 0 (a new center)."""
    if self.opt_state is None:
      return

    def remap(path, leaf):
      if not any(getattr(k, "key", None) == "centers" for k in path):
        return leaf
      old = np.asarray(leaf)
      new = np.zeros((len(rows),) + old.shape[1:], old.dtype)
      new[rows >= 0] = old[rows[rows >= 0]]
      return jnp.asarray(new)
    self.opt_state = jax.tree_util.tree_map_with_path(remap, self.opt_state)

  def trainable(self):
    return {"net": self.variables["params"], "centers": jnp.asarray(self.centers)}

  def set_trainable(self, trainable):
    super().set_trainable(trainable)
    self.centers = np.asarray(trainable["centers"], np.float32)

  def phase_constants(self, task):
    # attach[i]: the center attached to training image i (eq. 6), -1 for none.
    attach = np.full(int(self.owners.max()) + 1, -1, np.int32)
    attach[self.owners[self.attached]] = np.flatnonzero(self.attached)
    del task
    return {"attach": jnp.asarray(attach), "probs": jnp.asarray(self.probs),
            "owners": jnp.asarray(self.owners)}

  def loss_fn(self):
    network, cached = self.network, self.cached
    sigma, weight = self.sigma, self.attach_weight

    def loss(trainable, batch_stats, x, y, ids, consts):
      v = {"params": trainable["net"], "batch_stats": batch_stats}
      out, stats = _apply(network, v, x, True, cached)
      emb, centers = out["embedding"], trainable["centers"]
      nca = soft_nca.soft_nca_loss(emb, y, centers, consts["probs"], sigma,
                                   exclude=ids, center_owners=consts["owners"])
      own = jnp.take(consts["attach"], ids, mode="fill", fill_value=-1)
      has = own >= 0
      att = losses.attachment_loss(emb, centers[jnp.maximum(own, 0)])
      return nca.mean() + weight * jnp.mean(jnp.where(has, att, 0.0)), stats
    return loss

  def sigmas(self):
    return [float(s) for s in self.config.eval.sigma_grid] or [self.sigma]

  def log_probs(self, x, seen, sigma):
    del seen   # Unseen classes have no center mass: p = 0 already.
    emb = self.outputs(x, "embedding")
    return np.concatenate([np.asarray(selection.soft_rule(
        emb[s:s + 1024], self.centers, self.probs, jnp.float32(sigma)))
                           for s in range(0, len(emb), 1024)])

  def state(self):
    return {**super().state(), "centers": self.centers, "probs": self.probs,
            "owners": self.owners, "attached": self.attached}

  def restore(self, state):
    self.centers = np.asarray(state["centers"], np.float32)
    self.probs = np.asarray(state["probs"], np.float32)
    self.owners = np.asarray(state["owners"], np.int32)
    self.attached = np.asarray(state["attached"], bool)
    super().restore(state)


class AddDropLearner(ImpostorLearner):
  add_drop = True


METHODS = {"softmax": SoftmaxLearner, "loose": ImpostorLearner,
           "add_drop": AddDropLearner}


def evaluate(learner: Learner, splits: dict[str, Split], groups, seen_tasks: int):
  """Sigma chosen on val of the seen classes; test top-1 overall and per task."""
  seen = np.concatenate(groups[:seen_tasks])
  val, test = splits["val"].of_classes(seen), splits["test"].of_classes(seen)
  best = None
  for sigma in sorted(learner.sigmas(), key=lambda s: -1.0 if s is None else s):
    acc = float(np.mean(learner.log_probs(val.inputs, seen, sigma).argmax(1)
                        == val.labels))
    if best is None or acc >= best[0]:
      best = (acc, sigma)
  pred = learner.log_probs(test.inputs, seen, best[1]).argmax(1)
  right = pred == test.labels
  return {"sigma": best[1], "val_top1": best[0], "test_top1": float(right.mean()),
          "test_top1_per_task": [float(right[np.isin(test.labels, g)].mean())
                                 for g in groups[:seen_tasks]]}


def forgetting(per_task: list[list[float]]) -> float:
  """Mean over tasks k < E of max_{k <= t < E} a[t][k] - a[E-1][k] (a[t]: the
  per-task test accuracies after task t); nan with fewer than two tasks."""
  final = len(per_task) - 1
  if final < 1:
    return float("nan")
  return float(np.mean([max(per_task[t][k] for t in range(k, final))
                        - per_task[final][k] for k in range(final)]))


def run_protocol(run, config, method: str, workdir: str,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """The protocol of the module docstring for `method` on `run` (a fgjax.train.Run of
  `config`); one result row per task, resuming from <workdir>/<method>/."""
  if method not in METHODS:
    raise ValueError(f"continual method {method!r} is unknown; use one of "
                     f"{', '.join(METHODS)} (config.continual.methods).")
  c = config.continual
  lr = float(c.softmax_learning_rate) if method == "softmax" else float(
      config.optim.learning_rate)
  learner = METHODS[method](run, config, run.num_classes, lr)
  splits = load_splits(run)
  groups = task_classes(run.num_classes, int(c.tasks))
  out_dir = os.path.join(workdir, method)
  os.makedirs(out_dir, exist_ok=True)
  files = lambda e: (os.path.join(out_dir, f"task{e}.json"),  # noqa: E731
                     os.path.join(out_dir, f"state{e}.msgpack"))
  rows = []
  while len(rows) < len(groups) and all(map(os.path.exists, files(len(rows)))):
    rows.append(workdir_lib.read_json(files(len(rows))[0]))
  if rows:   # Resume: a finished task is read, not rerun.
    with open(files(len(rows) - 1)[1], "rb") as f:
      learner.restore(flax.serialization.msgpack_restore(f.read()))
  for e in range(len(rows), len(groups)):
    classes = groups[e]
    row_file, state_file = files(e)
    task = splits["train"].of_classes(classes)
    learner.start_task(task)
    seed = int(config.seed)
    loss_t = learner.train(task, int(c.train_epochs), (seed, e, 0))
    info = learner.after_train(task)
    loss_f = learner.train(task, int(c.finetune_epochs), (seed, e, 1))
    row = {"method": method, "task": e, "classes": [int(x) for x in classes],
           "train_images": int(len(task.labels)), "loss_train": loss_t,
           "loss_finetune": loss_f, "add_drop": info,
           "num_centers": int(len(getattr(learner, "centers", ()))),
           **evaluate(learner, splits, groups, e + 1)}
    forgot = forgetting([r["test_top1_per_task"] for r in rows]
                        + [row["test_top1_per_task"]])
    row["forgetting"] = None if np.isnan(forgot) else forgot   # None after task 1
    with open(state_file + ".tmp", "wb") as f:
      f.write(flax.serialization.msgpack_serialize(
          jax.tree.map(np.asarray, learner.state())))
    os.replace(state_file + ".tmp", state_file)
    workdir_lib.write_json(row_file, row)
    rows.append(row)
    log(f"{method} task {e}: seen-class test top-1 {row['test_top1']:.3f} "
        f"per task {['%.3f' % a for a in row['test_top1_per_task']]} "
        f"centers {row['num_centers']} {info}")
  return rows
