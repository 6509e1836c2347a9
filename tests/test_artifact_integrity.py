"""The artifact is written atomically and refuses, at load, to serve damaged files."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import digits_loose
from fgjax import artifact
from fgjax import impostors as impostors_lib
from fgjax import schemes
from fgjax import train
from fgjax.models import nets

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def parts():
  """An untrained digits impostor network: exporting it takes a fraction of a second."""
  config = digits_loose.get_config()
  network = nets.build(config.model, NUM_CLASSES, pretrained=False,
                       net=schemes.resolve(config).net)
  rng = np.random.default_rng(0)
  imps = impostors_lib.ImpostorSet(rng.normal(size=(20, 64)).astype(np.float32),
                                   np.arange(20, dtype=np.int32) % NUM_CLASSES)
  return dict(config=config, network=network, variables=network.init(0, 8),
              impostors=imps, sigma=0.5)


def kill(*args, **kwargs):
  raise KeyboardInterrupt("killed")


def export(parts, path, names="c"):
  return artifact.export(str(path), class_names=[f"{names}{i}" for i in range(10)],
                         **parts)


@pytest.fixture(scope="module")
def pristine(parts, tmp_path_factory):
  return export(parts, tmp_path_factory.mktemp("pristine") / "artifact")


@pytest.fixture
def copy(pristine, tmp_path):
  return shutil.copytree(pristine, tmp_path / "artifact")


def rebuild_manifest(path):
  """As a consistent export of these files would have it: only the load checks remain."""
  files = sorted(set(os.listdir(path)) - {artifact.MANIFEST})
  with open(os.path.join(path, artifact.MANIFEST), "w") as f:
    json.dump({"files": {n: {"size": os.path.getsize(os.path.join(path, n)),
                             "sha256": artifact._sha256(os.path.join(path, n))}
                         for n in files}}, f)


def test_export_then_load_lists_every_file(pristine):
  with open(os.path.join(pristine, artifact.MANIFEST)) as f:
    files = json.load(f)["files"]
  assert sorted(files) == sorted(set(os.listdir(pristine)) - {artifact.MANIFEST})
  assert {"meta.json", "config.json", "class_names.json", "variables.msgpack",
          "impostors.npz"} <= set(files)
  for name, entry in files.items():
    assert entry["size"] == os.path.getsize(os.path.join(pristine, name))
    assert entry["sha256"] == artifact._sha256(os.path.join(pristine, name))
  model = artifact.Model(pristine)
  assert model.class_names == [f"c{i}" for i in range(10)]
  assert model.log_probs(np.zeros((2, 8, 8, 3), np.float32)).shape == (2, NUM_CLASSES)
  assert not any(n.startswith("artifact.") for n in os.listdir(os.path.dirname(pristine)))


def test_killed_export_keeps_the_old_artifact(parts, tmp_path, monkeypatch):
  path = export(parts, tmp_path / "artifact", names="old")
  with monkeypatch.context() as m:
    m.setattr(np, "savez", kill)  # After the JSON files and the weights are written.
    with pytest.raises(KeyboardInterrupt):
      export(parts, path, names="new")
  assert artifact.Model(path).class_names == [f"old{i}" for i in range(10)]
  # The next export drops the partial one and replaces the old artifact.
  export(parts, path, names="new")
  assert artifact.Model(path).class_names == [f"new{i}" for i in range(10)]
  assert sorted(os.listdir(tmp_path)) == ["artifact"]


def test_killed_between_the_renames_recovers_the_old_artifact(parts, tmp_path,
                                                              monkeypatch):
  path = export(parts, tmp_path / "artifact", names="old")
  rename = os.rename

  def killed_before_new_goes_in(src, dst):
    if src.endswith(".partial"):
      raise KeyboardInterrupt("killed")
    rename(src, dst)
  with monkeypatch.context() as m:
    m.setattr(os, "rename", killed_before_new_goes_in)
    with pytest.raises(KeyboardInterrupt):
      export(parts, path, names="new")
  assert not os.path.exists(path)
  # Another killed export still begins by putting the old, complete artifact back.
  with monkeypatch.context() as m:
    m.setattr(np, "savez", kill)
    with pytest.raises(KeyboardInterrupt):
      export(parts, path, names="newer")
  assert artifact.Model(path).class_names == [f"old{i}" for i in range(10)]


def truncate(path, name):
  with open(os.path.join(path, name), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(path, name)) // 2)


def flip_bytes(path, name):
  with open(os.path.join(path, name), "r+b") as f:
    f.seek(os.path.getsize(os.path.join(path, name)) // 2)
    chunk = f.read(16)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def short_class_names(path, name):
  with open(os.path.join(path, name), "w") as f:
    json.dump([f"c{i}" for i in range(9)], f)


def delete(path, name):
  os.remove(os.path.join(path, name))


def not_a_zip(path, name):
  with open(os.path.join(path, name), "wb") as f:
    f.write(b"PK\x03\x04 not really a zip")


def labels_out_of_range(path, name):
  np.savez(os.path.join(path, name), centers=np.zeros((3, 64), np.float32),
           labels=np.array([0, 1, NUM_CLASSES], np.int32))


@pytest.mark.parametrize("damage, name", [
    (truncate, "variables.msgpack"), (delete, "impostors.npz"),
    (short_class_names, "class_names.json"), (flip_bytes, "impostors.npz"),
    (flip_bytes, "variables.msgpack"), (truncate, "meta.json")])
def test_manifest_names_the_damaged_file(copy, damage, name):
  damage(copy, name)
  with pytest.raises(artifact.ArtifactError, match=name) as e:
    artifact.Model(copy)
  assert "launch.py" in str(e.value)


# The same damage behind a manifest that agrees with it (hand-assembled or re-manifested
# files): the load-time checks still name the file.
@pytest.mark.parametrize("damage, name", [
    (truncate, "variables.msgpack"), (delete, "impostors.npz"),
    (short_class_names, "class_names.json"), (not_a_zip, "impostors.npz"),
    (labels_out_of_range, "impostors.npz"), (truncate, "class_names.json")])
def test_load_checks_name_the_inconsistent_file(copy, damage, name):
  damage(copy, name)
  rebuild_manifest(copy)
  with pytest.raises(artifact.ArtifactError, match=name):
    artifact.Model(copy)


def test_missing_manifest_says_how_to_export_again(copy):
  os.remove(os.path.join(copy, artifact.MANIFEST))
  with pytest.raises(artifact.ArtifactError, match=r"manifest\.json.*launch\.py"):
    artifact.Model(copy)


def test_results_json_is_written_after_the_artifact(tmp_path, monkeypatch):
  config = digits_loose.get_config()
  config.train.num_steps = 2
  config.num_devices = 1
  monkeypatch.setattr(artifact, "export", kill)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()
