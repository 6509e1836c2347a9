"""PyTorch state_dicts onto flax trees, and the local cache of downloaded weights.

`state_dict_to_flax` maps {torch name: array} (from `fgjax.models.pth_reader.load_pth`)
to {'params', 'batch_stats'} with a per-model function from torch module paths to flax
module paths (OIHW -> HWIO, Linear (out, in) -> (in, out), BN weight/bias/running_mean/
running_var -> scale/bias/mean/var) and checks every name and shape against the model's
own init.

Weights that are not shipped with a package are cached like torchvision/timm do, in
`$FGJAX_WEIGHTS_DIR` (default `~/.cache/fgjax/weights`), downloaded once from the
torchvision URL and verified against the sha256 prefix in the file name.
"""

import collections
import hashlib
import os
import pathlib
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Any, Callable, Optional, Sequence

import numpy as np


# ----------------------------------------------------------------------------- mapping


_REQUIRED_LEAVES = {"BatchNorm": ("weight", "bias", "running_mean", "running_var"),
                    "Conv/Linear": ("weight",)}


def _flax_leaves(prefix: str, tensors: dict[str, np.ndarray],
                 source: str) -> dict[str, dict]:
  """One torch module's tensors -> {'params': {...}, 'batch_stats': {...}} leaves."""
  is_bn = bool({"running_mean", "running_var"} & tensors.keys())
  kind = "BatchNorm" if is_bn else "Conv/Linear"
  names = {k: f"{prefix}.{k}" if prefix else k for k in _REQUIRED_LEAVES[kind]}
  missing = [names[k] for k in _REQUIRED_LEAVES[kind] if k not in tensors]
  if missing:
    raise ValueError(f"{source}: the state_dict lacks {missing} expected for a {kind} "
                     f"layer (it has {sorted(tensors)}): is this the right "
                     "architecture and a complete file?")
  if kind == "BatchNorm":
    return {"params": {"scale": tensors["weight"], "bias": tensors["bias"]},
            "batch_stats": {"mean": tensors["running_mean"],
                            "var": tensors["running_var"]}}
  w = tensors["weight"]
  if w.ndim == 4:  # Conv OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C) as well).
    params = {"kernel": np.transpose(w, (2, 3, 1, 0))}
  elif w.ndim == 2:  # Linear (out, in) -> Dense (in, out).
    params = {"kernel": w.T}
  else:
    raise ValueError(f"{source}: unsupported weight {names['weight']!r} of shape "
                     f"{w.shape}: is this the right architecture?")
  if "bias" in tensors:
    params["bias"] = tensors["bias"]
  return {"params": params}


def _set(tree: dict, path: Sequence[str], value: dict) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  if path[-1] in tree:
    raise ValueError(f"two torch modules map to the same flax path {'/'.join(path)}.")
  tree[path[-1]] = value


def state_dict_to_flax(state_dict: dict[str, np.ndarray],
                       key_map: Callable[[str], Optional[tuple[str, ...]]],
                       template: dict[str, Any], source: str) -> dict[str, Any]:
  """Converts a torch state_dict to flax variables shaped like `template`.

  Args:
    state_dict: torch parameter name -> array (from `load_pth`).
    key_map: torch module prefix (e.g. '_blocks.3._bn1') -> flax module path (e.g.
      ('block3', 'depthwise', 'bn')), or None to drop that module (e.g. the ImageNet
      classifier when include_top=False). Unknown prefixes must raise ValueError.
    template: {'params': ..., 'batch_stats': ...} from module.init (or eval_shape),
      used to check that every leaf is present with the right shape.
    source: the file name, for error messages.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 NumPy arrays.

  Raises:
    ValueError: a name or shape does not match the architecture, or a module lacks a
      tensor its layer type needs.
  """
  modules: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for name, value in state_dict.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{source}: entry {name!r} is not a tensor; expected a state_dict.")
    prefix, _, leaf = name.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    modules[prefix][leaf] = value
  out = {"params": {}, "batch_stats": {}}
  for prefix, tensors in modules.items():
    path = key_map(prefix)
    if path is None:
      continue
    for collection, leaves in _flax_leaves(prefix, tensors, source).items():
      _set(out[collection], path, {k: np.asarray(v, np.float32)
                                   for k, v in leaves.items()})
  for collection in ("params", "batch_stats"):
    _check_same_structure(template.get(collection, {}), out[collection],
                          f"{source} [{collection}]")
  return out


def _check_same_structure(want: Any, got: Any, where: str, path: str = "") -> None:
  if hasattr(want, "items"):
    if not isinstance(got, dict):
      raise ValueError(f"{where}: expected a module at '{path}', got a tensor.")
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
      raise ValueError(f"{where}: at '{path or '/'}' missing {missing}, unexpected "
                       f"{extra}; the file does not match this architecture.")
    for k in want:
      _check_same_structure(want[k], got[k], where, f"{path}/{k}")
  elif tuple(np.shape(want)) != tuple(np.shape(got)):
    raise ValueError(f"{where}: '{path}' has shape {np.shape(got)} in the file but the "
                     f"model expects {tuple(np.shape(want))}.")


# ------------------------------------------------------------------------ weight cache


def weights_dir() -> pathlib.Path:
  """`$FGJAX_WEIGHTS_DIR`, default `~/.cache/fgjax/weights`."""
  env = os.environ.get("FGJAX_WEIGHTS_DIR")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache/fgjax/weights"


def hash_prefix(filename: str) -> Optional[str]:
  """The sha256 prefix torchvision puts in its file names ('resnet18-f37072fd.pth')."""
  m = re.search(r"-([0-9a-f]{8,})\.", filename)
  return m.group(1) if m else None


def sha256(path: "str | os.PathLike") -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def download(url: str, dest: pathlib.Path, expected_prefix: Optional[str]) -> None:
  """Downloads `url` to `dest` atomically, checking the sha256 prefix first.

  Raises:
    ValueError: the sha256 of the download does not start with `expected_prefix` (the
      partial file is deleted and `dest` is not created).
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
      shutil.copyfileobj(r, f)
    if expected_prefix is not None:
      digest = sha256(tmp)
      if not digest.startswith(expected_prefix):
        raise ValueError(f"downloaded {url} has sha256 {digest}, which does not start "
                         f"with {expected_prefix}: corrupt or wrong file (deleted).")
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fetch_weights(filename: str, url: str,
                  weights_path: "Optional[str | os.PathLike]" = None) -> pathlib.Path:
  """Returns a local path to `filename`: `weights_path`, the cache, or a fresh download.

  Downloads are skipped when `$FGJAX_OFFLINE` is set (to anything but '' or '0').

  Raises:
    FileNotFoundError: the file is neither at `weights_path` nor in the cache and could
      not be downloaded; the message says which file, where it was looked for and where
      to put it.
    ValueError: a download did not match the file name's sha256 prefix.
  """
  if weights_path is not None:
    path = pathlib.Path(weights_path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"weights_path={str(path)!r} does not exist (expected a "
                              f"copy of {filename}{' from ' + url if url else ''}).")
    return path
  cached = weights_dir() / filename
  if cached.is_file():
    return cached
  offline = os.environ.get("FGJAX_OFFLINE", "") not in ("", "0")
  reason = "FGJAX_OFFLINE is set"
  if not offline:
    try:
      print(f"fgjax: downloading {url} to {cached}", file=sys.stderr)
      download(url, cached, hash_prefix(filename))
      return cached
    except (urllib.error.URLError, OSError) as e:
      reason = f"download failed: {e}"
  raise FileNotFoundError(
      f"Pretrained weights {filename} not found ({reason}). Looked in {cached} "
      f"(cache dir from $FGJAX_WEIGHTS_DIR, default ~/.cache/fgjax/weights). Download "
      f"{url} and put it at {cached}, or pass weights_path=<file>.")
