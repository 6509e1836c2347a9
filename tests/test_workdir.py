"""Workdir guarantees: config comparison on resume, atomic JSON, metrics truncation."""

import json
import os

import numpy as np
import pytest

from configs import common
from fgjax import workdir


def _dict(**changes):
  c = common.get_config()
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return json.loads(json.dumps(c.to_dict()))  # as config.json holds it


def test_config_changes_split_harmless_from_incompatible():
  old = _dict()
  bad, fine = workdir.config_changes(old, _dict(**{
      "train.num_epochs": 60, "eval.sigma_grid": (0.5,), "train.log_every_steps": 7,
      "model.pooling": "kmax", "loss.nca.sigma": 0.5, "train.batch_size": 16}))
  assert [f for f, _, _ in bad] == ["loss.nca.sigma", "model.pooling", "train.batch_size"]
  assert [f for f, _, _ in fine] == ["eval.sigma_grid", "train.log_every_steps",
                                     "train.num_epochs"]
  # The run length decides a cosine schedule's learning rates.
  bad, _ = workdir.config_changes(_dict(**{"optim.schedule": "cosine"}),
                                  _dict(**{"optim.schedule": "cosine",
                                           "train.num_epochs": 60}))
  assert [f for f, _, _ in bad] == ["train.num_epochs"]
  # A field one side lacks is a change too.
  old.pop("scheme")
  bad, _ = workdir.config_changes(old, _dict())
  assert bad == [("scheme", "(absent)", "fixed")]


def test_fields_added_later_resume_old_workdirs_only_at_their_old_behaviour():
  old = _dict()
  del old["model"]["exit_stages"], old["loss"]["exit_ce"]  # a config.json from before
  bad, fine = workdir.config_changes(old, _dict())
  assert bad == [] and {f for f, _, _ in fine} == {
      "model.exit_stages", "loss.exit_ce.weight", "loss.exit_ce.input"}
  bad, _ = workdir.config_changes(old, _dict(**{"model.exit_stages": ("map",)}))
  assert [f for f, _, _ in bad] == ["model.exit_stages"]


def test_check_config(tmp_path):
  assert workdir.check_config(str(tmp_path), _dict()) is False  # new workdir
  workdir.write_json(str(tmp_path / "config.json"), _dict())
  assert workdir.check_config(str(tmp_path), _dict(**{"train.num_epochs": 3})) is True
  with pytest.raises(ValueError) as e:
    workdir.check_config(str(tmp_path), _dict(scheme="tied", **{"model.embed_dim": 64}))
  assert "config.scheme: 'fixed' -> 'tied'" in str(e.value)
  assert "config.model.embed_dim: 512 -> 64" in str(e.value)
  assert "--workdir" in str(e.value)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is unreadable"):
    workdir.check_config(str(tmp_path), _dict())


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
  path = str(tmp_path / "r.json")
  workdir.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": (1, 2)})
  assert workdir.read_json(path) == {"a": 0.5, "b": [0, 1, 2], "c": [1, 2]}
  assert os.listdir(tmp_path) == ["r.json"]


def test_truncate_metrics(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4, 5)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
  workdir.truncate_metrics(str(tmp_path), 3)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
  workdir.truncate_metrics(str(tmp_path / "none"), 3)  # no file: nothing to do
