"""Backbone registry, layers and architectures: known answers and PyTorch parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import models
from fgjax.models import layers


@functools.lru_cache(maxsize=None)
def _sample_images_224() -> np.ndarray:
  """scikit-learn's china.jpg and flower.jpg, resized to 224x224 bilinear, 0..255."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  images = load_sample_images().images
  return np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR))
                   for im in images]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _lite0_top():
  spec = models.get("efficientnet_lite0", pretrained=True, include_top=True)
  apply = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))
  return spec, apply


def test_known_answer_efficientnet_lite0_sample_images():
  spec, apply = _lite0_top()
  x = models.normalise(_sample_images_224(), spec)
  logits = np.asarray(apply(spec.variables, x))
  assert logits.shape == (2, 1000)
  # china.jpg -> 442 'bell cote' (n02825657); flower.jpg -> 985 'daisy' (n11939491).
  np.testing.assert_array_equal(logits.argmax(-1), [442, 985])


def test_names_and_unknown_name():
  assert models.names() == ("efficientnet_lite0", "resnet18", "resnet50", "small_cnn",
                             "squeezenet1_1")
  with pytest.raises(ValueError, match="known backbones: efficientnet_lite0, resnet18"):
    models.get("resnet19")
  with pytest.raises(ValueError, match="no pretrained weights"):
    models.get("small_cnn", pretrained=True)
  with pytest.raises(ValueError, match="pretrained=False"):
    models.get("resnet18", weights_path="/nonexistent.pth")


@pytest.mark.parametrize("name,size", [("small_cnn", 8), ("small_cnn", 32),
                                       ("efficientnet_lite0", 33),
                                       ("squeezenet1_1", 35), ("resnet18", 33)])
def test_spec_shapes_stages_and_train_mode(name, size):
  spec = models.get(name)
  assert sorted(spec.variables["params"]) == sorted(spec.stage_names)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  # Shapes only (tracing, no compile): values are covered by the parity tests.
  feats = jax.eval_shape(lambda v, x: spec.module.apply(v, x, train=False),
                         spec.variables, x)
  assert feats.shape == (2, spec.feature_dim) and feats.dtype == jnp.float32
  out, updates = jax.eval_shape(
      lambda v, x: spec.module.apply(v, x, train=True, mutable=["batch_stats"]),
      spec.variables, x)
  assert out.shape == (2, spec.feature_dim)
  assert (jax.tree.structure(dict(updates).get("batch_stats", {})) ==
          jax.tree.structure(spec.variables["batch_stats"]))


def test_small_cnn_train_mode_updates_batch_stats():
  spec = models.get("small_cnn")
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3)) * 3.0 + 1.0
  out, updates = jax.jit(lambda v, x: spec.module.apply(
      v, x, train=True, mutable=["batch_stats"]))(spec.variables, x)
  assert out.shape == (4, 128)
  # First BN sees conv(x) with batch mean m; running mean <- 0.9 * 0 + 0.1 * m.
  kernel = np.asarray(spec.variables["params"]["stage0"]["conv"]["kernel"])
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + 12, j:j + 12], kernel[i, j])
             for i in range(3) for j in range(3))
  np.testing.assert_allclose(updates["batch_stats"]["stage0"]["bn"]["mean"],
                             0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_deterministic_init():
  a, b = models.get("small_cnn"), models.get("small_cnn")
  jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
  assert float(jnp.abs(a.variables["params"]["stage0"]["conv"]["kernel"]).sum()) > 0


def test_bad_input_errors():
  spec = models.get("small_cnn")
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    spec.module.apply(spec.variables, jnp.zeros((2, 3, 16, 16)))
  with pytest.raises(TypeError, match="floating-point"):
    spec.module.apply(spec.variables, jnp.zeros((2, 16, 16, 3), jnp.uint8))


@pytest.mark.parametrize("size,kernel,stride,want", [
    (224, 3, 2, (0, 1)), (112, 3, 1, (1, 1)), (56, 5, 2, (1, 2)), (7, 5, 2, (2, 2)),
    (5, 1, 1, (0, 0)), (6, 3, 3, (0, 0))])
def test_tf_same_padding_known_values(size, kernel, stride, want):
  assert layers.tf_same_padding(size, kernel, stride) == want
  lo, hi = want
  assert (size + lo + hi - kernel) // stride + 1 == -(-size // stride)


@pytest.mark.parametrize("stride,pads", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (1, 2)))])
def test_depthwise_shifted_matches_numpy(stride, pads):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 8, 5)).astype(np.float32)
  w = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
  got = np.asarray(layers.depthwise_conv_shifted(jnp.asarray(x), jnp.asarray(w),
                                                 stride, pads))
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - 3) // stride + 1
  wo = (xp.shape[2] - 3) // stride + 1
  want = np.zeros((2, ho, wo, 5), np.float64)
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
      want[:, i, j, :] = np.einsum("nhwc,hwc->nc", patch, w[:, :, 0, :])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lax = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), (stride, stride),
                                     pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=5)
  np.testing.assert_allclose(got, np.asarray(lax), rtol=1e-5, atol=1e-5)


def test_max_pool_torch_ceil_mode_matches_numpy():
  x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1)[:, ::-1]
  got = np.asarray(layers.max_pool_torch(jnp.asarray(x), 3, 2, ceil_mode=True))
  # torch: out = ceil((8 - 3) / 2) + 1 = 4; the last window covers rows 6..7 only.
  assert got.shape == (2, 4, 4, 1)
  for i in range(4):
    for j in range(4):
      np.testing.assert_array_equal(
          got[:, i, j, 0], x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, 0].max(axis=(1, 2)))


def test_fold_batch_norm_same_outputs():
  spec = models.get("small_cnn")
  rng = np.random.default_rng(0)
  # Non-trivial statistics so the fold is actually exercised.
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32),
                       spec.variables["batch_stats"])
  variables = {"params": spec.variables["params"], "batch_stats": stats}
  x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  want = spec.module.apply(variables, x, train=False)
  folded = layers.fold_batch_norm(variables, spec.bn_epsilon)
  got = spec.module.clone(fold_bn=True).apply(folded, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------- parity with PyTorch


def _assert_logits_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)


def test_parity_efficientnet_lite0_vs_reference():
  torch = pytest.importorskip("torch", reason="PyTorch parity needs torch")
  ref_lib = pytest.importorskip("efficientnet_lite_pytorch",
                                reason="reference implementation not installed")
  from fgjax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
  spec, apply = _lite0_top()
  net = ref_lib.EfficientNet.from_name("efficientnet-lite0")
  state = torch.load(efficientnet_lite.default_weights_path(), map_location="cpu",
                     weights_only=True)
  net.load_state_dict(state)
  net.eval()
  x = models.normalise(_sample_images_224(), spec)
  with torch.no_grad():
    want = net(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
  _assert_logits_close(apply(spec.variables, x), want)


@pytest.mark.parametrize("name,size", [("squeezenet1_1", 64), ("resnet18", 64),
                                       ("resnet50", 64)])
def test_parity_torchvision(name, size, tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch parity needs torch")
  tv = pytest.importorskip("torchvision", reason="PyTorch parity needs torchvision")
  torch.manual_seed(0)
  net = getattr(tv.models, name)(weights=None)
  # Random running statistics, so BN is not the identity in eval mode.
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
  net.eval()
  path = tmp_path / f"{name}.pth"
  torch.save(net.state_dict(), path)
  spec = models.get(name, pretrained=True, weights_path=path, include_top=True)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))(spec.variables, x)
  _assert_logits_close(got, want)
  # The features (include_top=False) are the pooled input of the classifier.
  feats = models.get(name, pretrained=True, weights_path=path)
  assert "classifier" not in feats.variables["params"]
