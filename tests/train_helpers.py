"""What the end-to-end training tests share: a small digits config with dotted
overrides, and readers of a workdir's metrics, results and checkpoints."""

import json
import pathlib

from configs import digits_loose
from fgjax import checkpoints
from fgjax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(scheme="loose", steps=12, **overrides):
  c = digits_loose.get_config()
  c.scheme = scheme
  c.train.num_steps = steps
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 4
  c.num_devices = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_rows(workdir):
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def read_losses(workdir):
  rows = read_rows(workdir)
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def restored(workdir, config_or_run, step=None):
  """(step, state) of checkpoint `step` (default: the latest) of `workdir`."""
  run = (config_or_run if isinstance(config_or_run, train.Run)
         else train.Run(config_or_run))
  mngr = checkpoints.manager(str(workdir))
  step = mngr.latest_step() if step is None else step
  state = run.restore(mngr, step)
  mngr.close()
  return step, state


def without_times(results):
  return {k: v for k, v in results.items() if k not in ("wall_seconds", "train_seconds")}


def aux_config(scheme="ce_extra", name="elope", steps=6, **overrides):
  return small_config(scheme, steps=steps, **{"loss.extra_terms": name, **overrides})
