"""Two processes on this machine train as one multi-host job (jax.distributed).

Each process sees 2 CPU devices; `config.distributed` joins them through a localhost
coordinator into one 4-device mesh with gloo collectives, as hosts of a GPU/TPU
cluster would be. The job must end where one process with 4 devices ends: the same
losses, impostors and test accuracy.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from tests.train_helpers import read_losses

REPO = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.train_helpers import small_config
from fgjax import train
config = small_config("loose", steps=6, num_devices=0,
                      **{{"train.checkpoint_every_steps": 3}})
if {process} >= 0:
  config.distributed, config.num_processes, config.process_id = True, 2, {process}
  config.coordinator_address = "localhost:{port}"
results = train.train_and_evaluate(config, {workdir!r})
import jax
print("RESULT " + json.dumps({{"process": jax.process_index(), "devices": jax.device_count(),
                              "test": results["splits"]["test"]["rbf"],
                              "sigma": results["sigma"]}}))
"""


def _start(process: int, devices: int, port: int, workdir: pathlib.Path):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = _SCRIPT.format(repo=str(REPO), process=process, port=port, workdir=str(workdir))
  return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc) -> dict:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(next(line for line in out.splitlines()
                         if line.startswith("RESULT "))[len("RESULT "):])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_as_many_devices(tmp_path):
  port = _free_port()
  hosts = [_start(i, 2, port, tmp_path / "two") for i in (0, 1)]
  single = _result(_start(-1, 4, 0, tmp_path / "one"))
  results = [_result(p) for p in hosts]
  assert [(r["process"], r["devices"]) for r in results] == [(0, 4), (1, 4)]
  assert single["devices"] == 4
  for r in results:  # Both processes evaluate the whole test split.
    assert r["test"] == single["test"] and r["sigma"] == single["sigma"]
  assert single["test"]["top1"] > 0.15   # chance: 0.1
  two, one = read_losses(tmp_path / "two"), read_losses(tmp_path / "one")
  assert sorted(two) == list(range(1, 7))
  for step in one:
    np.testing.assert_allclose(two[step], one[step], rtol=1e-5)
  # Process 0 wrote the artifact: the 1,078 impostors, without the padding rows.
  written = [np.load(d / "artifact" / "impostors.npz") for d in (tmp_path / "two",
                                                                 tmp_path / "one")]
  assert written[0]["centers"].shape == (1078, 64)
  # gloo sums in another order than one process does; Adam's sign-like steps on
  # near-zero gradients carry that to ~1e-4 on a few impostor coordinates.
  np.testing.assert_allclose(written[0]["centers"], written[1]["centers"], rtol=1e-4,
                             atol=3e-4)
