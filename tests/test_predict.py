"""The exported artifact and the predict CLI, on a briefly trained digits model."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import digits_loose
from fgjax import artifact
from fgjax import data
from fgjax import evaluate
from fgjax import predict
from fgjax import train
from fgjax.data import transforms

REPO = pathlib.Path(__file__).resolve().parents[1]


def train_briefly(tmp_path_factory, name, config):
  """(workdir, results) of `config` trained for 40 steps on one device."""
  workdir = tmp_path_factory.mktemp(name)
  config.train.num_steps = 40
  config.num_devices = 1
  return workdir, train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = digits_loose.get_config()
  workdir, results = train_briefly(tmp_path_factory, "digits", config)
  return config, workdir, results


def digits_test_images(config, model, count=None):
  """(normalised images, labels) of the first `count` (all) digits test images."""
  test = data.get_splits(config.data).test
  n = len(test) if count is None else count
  images = np.stack([transforms.eval_transform(test[i]["image"], image_size=8,
                                               resize_size=8) for i in range(n)])
  return (transforms.normalize(images, model.mean, model.std),
          np.array([test[i]["label"] for i in range(n)]))


def digits_test_files(config, folder, count):
  """Paths of the first `count` digits test images, written to `folder` as PNGs."""
  test = data.get_splits(config.data).test
  paths = []
  for i in range(count):
    path = folder / f"img{i}.png"
    Image.fromarray(test[i]["image"]).save(path)
    paths.append(str(path))
  return paths


def test_artifact_reproduces_test_accuracy(trained):
  config, workdir, results = trained
  model = artifact.Model(str(workdir / "artifact"))
  assert model.sigma == results["sigma"]
  x, labels = digits_test_images(config, model)
  log_probs = model.log_probs(x)
  np.testing.assert_allclose(np.exp(log_probs).sum(1), 1.0, rtol=1e-5)
  top1 = evaluate.topk_accuracy(log_probs, labels, (1,))["top1"]
  assert top1 == pytest.approx(results["splits"]["test"]["rbf"]["top1"], abs=1e-9)


@pytest.mark.parametrize("engine", ["xla", "onnx", "openvino"])
def test_cpu_engines_give_the_same_predictions(trained, engine):
  if engine == "openvino":
    pytest.importorskip("openvino", reason="engine='openvino' needs openvino")
  config, workdir, _ = trained
  reference = artifact.Model(str(workdir / "artifact"))
  x, _ = digits_test_images(config, reference, 21)
  expected = reference.log_probs(x)
  # batch_size 8 over 21 images: two full batches and one zero-padded one.
  fast = artifact.Model(str(workdir / "artifact"), engine=engine, batch_size=8)
  got = fast.log_probs(x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_int8_engine_serves_what_training_calibrated(trained):
  config, workdir, results = trained
  assert results["int8"] == {"images": 64, "float_ops": []}
  reference = artifact.Model(str(workdir / "artifact"))
  x, _ = digits_test_images(config, reference)
  expected = reference.log_probs(x)
  got = artifact.Model(str(workdir / "artifact"), engine="onnx-int8",
                       batch_size=8).log_probs(x)
  np.testing.assert_allclose(np.exp(got).sum(1), 1.0, rtol=1e-5)
  assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98
  assert 0 < np.abs(np.exp(got) - np.exp(expected)).max() < 0.1
  with pytest.raises(ValueError, match="precision='int8' is for engine='openvino'"):
    artifact.Model(str(workdir / "artifact"), precision="int8")
  if importlib.util.find_spec("openvino"):
    # OpenVINO runs the same stored calibration's int8 graph.
    vino = artifact.Model(str(workdir / "artifact"), engine="openvino",
                          precision="int8", batch_size=8).log_probs(x)
    assert (vino.argmax(1) == expected.argmax(1)).mean() >= 0.98
    # Two int8 kernels (ORT's, OpenVINO's) round differently, and by how much depends
    # on the CPU's int8 instructions: the worst image moved 0.14 in probability on one
    # VM, so the bound is on the typical image, the argmax check above on every one.
    diff = np.abs(np.exp(vino) - np.exp(got))
    assert diff.max() < 0.3 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_int8_engine_needs_a_calibrated_artifact(trained, tmp_path):
  _, workdir, _ = trained
  model = artifact.Model(str(workdir / "artifact"))
  parts = dict(config=model_config(workdir), network=model.network,
               class_names=model.class_names, variables=model.variables,
               impostors=model.impostors, sigma=model.sigma)
  artifact.export(str(tmp_path / "plain"), **parts)
  with pytest.raises(artifact.ArtifactError,
                     match="no int8 calibration.*int8_calibration_images=0.*"
                     "engine='onnx'"):
    artifact.Model(str(tmp_path / "plain"), engine="onnx-int8")
  artifact.export(str(tmp_path / "refused"), **parts,
                  int8={"refused": "no int8 kernel for op type(s) Erf"})
  with pytest.raises(artifact.ArtifactError, match="the export refused it: no int8 "
                     "kernel for op type.s. Erf"):
    artifact.Model(str(tmp_path / "refused"), engine="onnx-int8")


def model_config(workdir):
  return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


def test_unknown_engine(trained):
  _, workdir, _ = trained
  with pytest.raises(ValueError, match="engine='tvm' is unknown"):
    artifact.Model(str(workdir / "artifact"), engine="tvm")


def test_predict_files_reports_bad_files_and_rejects(trained, tmp_path):
  config, workdir, _ = trained
  paths = digits_test_files(config, tmp_path, 3)
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
       "--engine=onnx-int8", str(folder)], capture_output=True, text=True, cwd=REPO,
      timeout=300, env=dict(os.environ, XLA_FLAGS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  doc = json.loads(proc.stdout)
  assert [os.path.basename(r["path"]) for r in doc["results"]] == ["a.png"]
  assert len(doc["results"][0]["top"]) == 5
  model = artifact.Model(str(workdir / "artifact"), engine="onnx-int8")
  image = transforms.eval_transform(test[0]["image"], image_size=8, resize_size=8)
  want = np.exp(model.log_probs(transforms.normalize(image[None], model.mean,
                                                     model.std)))[0]
  assert doc["results"][0]["top"][0]["index"] == int(want.argmax())
  assert doc["results"][0]["top"][0]["prob"] == pytest.approx(float(want.max()),
                                                              rel=1e-5)


def test_not_an_artifact(tmp_path):
  with pytest.raises(FileNotFoundError, match="meta.json"):
    artifact.Model(str(tmp_path))


def test_explain_draws_where_the_network_looks(trained, tmp_path):
  config, workdir, _ = trained
  paths = digits_test_files(config, tmp_path, 5)
  model = artifact.Model(str(workdir / "artifact"))
  out = predict.predict_files(model, paths, batch_size=4, explain_dir=str(tmp_path / "x"))
  pictures = sorted(os.listdir(tmp_path / "x"))
  assert pictures == ["explain_000.png", "explain_001.png"]  # batches of 4 and 1
  assert all((tmp_path / "x" / p).stat().st_size > 2000 for p in pictures)
  assert [r["explained"] for r in out] == [str(tmp_path / "x" / pictures[0])] * 4 + [
      str(tmp_path / "x" / pictures[1])]
  x, _ = digits_test_images(config, model, 5)
  looks = model.explain(x)
  # The digits network has no localization module: the channel mean of its map.
  out_map = model.network.module.apply(model.variables, x)["map"]
  np.testing.assert_allclose(looks["heatmap"], np.asarray(out_map).mean(-1), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose([r["box"] for r in out], looks["box"], atol=1e-6)
  assert np.all((looks["box"] >= 0) & (looks["box"] <= 1))
  assert np.all(looks["box"][:, 2] > looks["box"][:, 0])
