"""The shape of fgjax.data: import graph without cycles, the source registry."""

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fgjax import data
from fgjax.data import registry

DATA_DIR = pathlib.Path(data.__file__).resolve().parent
MODULES = sorted(p.stem for p in DATA_DIR.glob("*.py") if p.stem != "__init__")


def _fgjax_imports(module: str) -> set[str]:
  """Every fgjax module `fgjax/data/<module>.py` imports, at any depth of the file."""
  tree = ast.parse((DATA_DIR / f"{module}.py").read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == "fgjax")
    elif isinstance(node, ast.ImportFrom) and node.module:
      assert node.level == 0, f"{module}.py: use absolute imports"
      if node.module.split(".")[0] == "fgjax":
        out.update(f"{node.module}.{a.name}" if node.module in ("fgjax", "fgjax.data")
                   else node.module for a in node.names)
  return out


def test_modules_are_the_expected_ones():
  assert MODULES == ["digits", "folder", "pipeline", "records", "registry", "splits",
                     "tfds", "transforms", "unknown"]


def test_no_import_cycle_and_splits_at_the_bottom():
  graph = {}
  for m in MODULES:
    deps = _fgjax_imports(m)
    # Nothing inside fgjax.data imports the package (its __init__ imports them all).
    assert "fgjax.data" not in deps, f"{m}.py imports fgjax.data itself"
    # Outside fgjax.data, only the plain-Python registry helper (no JAX, no fgjax).
    outside = {d for d in deps if not d.startswith("fgjax.data.")}
    assert outside <= {"fgjax.registries"}, f"{m}.py imports {outside} from outside"
    graph[m] = {d.split(".")[2] for d in deps if d.startswith("fgjax.data.")}
  assert graph["splits"] == set() and graph["transforms"] == set()
  assert graph["registry"] == {"splits"}
  state = {}

  def visit(m, path):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
    state[m] = "open"
    for d in sorted(graph[m]):
      visit(d, path + [m])
    state[m] = "done"

  for m in MODULES:
    visit(m, [])


def test_splits_runs_alone_with_numpy_only():
  # Loaded from its file, outside the package: it needs nothing from fgjax.
  code = (
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('lone', {str(DATA_DIR / 'splits.py')!r})\n"
      "m = sys.modules['lone'] = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(m)\n"
      "assert not any(k.split('.')[0] == 'fgjax' for k in sys.modules), 'fgjax loaded'\n"
      "print(m.parse_split('train:3,test:1'))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "counts" in out.stdout


def test_register_a_new_source_by_name():
  @registry.register("toy_test_source")
  def toy(cfg):
    images = np.zeros((4, 2, 2, 3), np.uint8)
    src = data.ArraySource(images, [0, 1, 0, 1], name=f"toy:{cfg.get('seed')}")
    return data.Splits(train=src, val=None, test=src, class_names=["a", "b"])
  try:
    assert "toy_test_source" in data.source_names()
    splits = data.get_splits({"source": "toy_test_source", "seed": 5})
    assert splits.train.name == "toy:5" and splits.num_classes == 2
    with pytest.raises(ValueError, match="already registered"):
      registry.register("toy_test_source")(lambda cfg: None)
    with pytest.raises(ValueError, match="config.data.seed"):  # Checked before the source.
      data.get_splits({"source": "toy_test_source", "seed": "x"})
  finally:
    registry.SOURCES.unregister("toy_test_source")
  assert "toy_test_source" not in data.source_names()
