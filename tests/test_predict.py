"""The exported artifact and the predict CLI, on a briefly trained digits model."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import digits_loose
from fgjax import artifact
from fgjax import data
from fgjax import evaluate
from fgjax import predict
from fgjax import train
from fgjax.data import transforms

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  config = digits_loose.get_config()
  config.train.num_steps = 40
  config.num_devices = 1
  results = train.train_and_evaluate(config, str(workdir))
  return config, workdir, results


def test_artifact_reproduces_test_accuracy(trained):
  config, workdir, results = trained
  model = artifact.Model(str(workdir / "artifact"))
  assert model.sigma == results["sigma"]
  test = data.get_splits(config.data).test
  images = np.stack([transforms.eval_transform(test[i]["image"], image_size=8,
                                               resize_size=8) for i in range(len(test))])
  labels = np.array([test[i]["label"] for i in range(len(test))])
  log_probs = model.log_probs(transforms.normalize(images, model.mean, model.std))
  np.testing.assert_allclose(np.exp(log_probs).sum(1), 1.0, rtol=1e-5)
  top1 = evaluate.topk_accuracy(log_probs, labels, (1,))["top1"]
  assert top1 == pytest.approx(results["splits"]["test"]["rbf"]["top1"], abs=1e-9)


@pytest.mark.parametrize("engine", ["xla", "onnx"])
def test_cpu_engines_give_the_same_predictions(trained, engine):
  if engine == "onnx":
    pytest.importorskip("onnx", reason="engine='onnx' needs the onnx package")
    pytest.importorskip("onnxruntime", reason="engine='onnx' needs onnxruntime")
  config, workdir, _ = trained
  test = data.get_splits(config.data).test
  images = np.stack([transforms.eval_transform(test[i]["image"], image_size=8,
                                               resize_size=8) for i in range(21)])
  reference = artifact.Model(str(workdir / "artifact"))
  x = transforms.normalize(images, reference.mean, reference.std)
  expected = reference.log_probs(x)
  # batch_size 8 over 21 images: two full batches and one zero-padded one.
  fast = artifact.Model(str(workdir / "artifact"), engine=engine, batch_size=8)
  got = fast.log_probs(x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_unknown_engine(trained):
  _, workdir, _ = trained
  with pytest.raises(ValueError, match="engine='tvm' is unknown"):
    artifact.Model(str(workdir / "artifact"), engine="tvm")


def test_predict_files_reports_bad_files_and_rejects(trained, tmp_path):
  config, workdir, _ = trained
  test = data.get_splits(config.data).test
  paths = []
  for i in range(3):
    p = tmp_path / f"img{i}.png"
    Image.fromarray(test[i]["image"]).save(p)
    paths.append(str(p))
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
  paths.insert(1, str(bad))
  model = artifact.Model(str(workdir / "artifact"))
  out = predict.predict_files(model, paths, topk=3, reject_entropy=0.0)
  assert [r["path"] for r in out] == paths
  assert "error" in out[1] and "broken.jpg" in out[1]["path"]
  for r in (out[0], out[2], out[3]):
    probs = [t["prob"] for t in r["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert r["entropy"] > 0 and r["unknown"]  # threshold 0: everything is rejected
  never = predict.predict_files(model, paths[:1], reject_entropy=1e9)
  assert not never[0]["unknown"]


def test_cli_json(trained, tmp_path):
  config, workdir, _ = trained
  test = data.get_splits(config.data).test
  folder = tmp_path / "imgs"
  folder.mkdir()
  Image.fromarray(test[0]["image"]).save(folder / "a.png")
  (folder / "notes.txt").write_text("not an image")
  proc = subprocess.run(
      [sys.executable, "-m", "fgjax.predict", f"--workdir={workdir}", "--json",
       "--engine=xla", str(folder)], capture_output=True, text=True, cwd=REPO, timeout=300,
      env=dict(os.environ, XLA_FLAGS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  doc = json.loads(proc.stdout)
  assert [os.path.basename(r["path"]) for r in doc["results"]] == ["a.png"]
  assert len(doc["results"][0]["top"]) == 5


def test_not_an_artifact(tmp_path):
  with pytest.raises(FileNotFoundError, match="meta.json"):
    artifact.Model(str(tmp_path))


def test_explain_draws_where_the_network_looks(trained, tmp_path):
  config, workdir, _ = trained
  test = data.get_splits(config.data).test
  paths = []
  for i in range(5):
    p = tmp_path / f"img{i}.png"
    Image.fromarray(test[i]["image"]).save(p)
    paths.append(str(p))
  model = artifact.Model(str(workdir / "artifact"))
  out = predict.predict_files(model, paths, batch_size=4, explain_dir=str(tmp_path / "x"))
  pictures = sorted(os.listdir(tmp_path / "x"))
  assert pictures == ["explain_000.png", "explain_001.png"]  # batches of 4 and 1
  assert all((tmp_path / "x" / p).stat().st_size > 2000 for p in pictures)
  assert [r["explained"] for r in out] == [str(tmp_path / "x" / pictures[0])] * 4 + [
      str(tmp_path / "x" / pictures[1])]
  images = np.stack([transforms.eval_transform(test[i]["image"], image_size=8,
                                               resize_size=8) for i in range(5)])
  looks = model.explain(transforms.normalize(images, model.mean, model.std))
  # The digits network has no localization module: the channel mean of its map.
  out_map = model.network.module.apply(
      model.variables, transforms.normalize(images, model.mean, model.std))["map"]
  np.testing.assert_allclose(looks["heatmap"], np.asarray(out_map).mean(-1), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose([r["box"] for r in out], looks["box"], atol=1e-6)
  assert np.all((looks["box"] >= 0) & (looks["box"] <= 1))
  assert np.all(looks["box"][:, 2] > looks["box"][:, 0])
