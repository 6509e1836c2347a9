"""Backbone registry, layers and architectures: known answers and PyTorch parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images

from fgjax import models
from fgjax.data import transforms
from fgjax.models import efficientnet_lite
from fgjax.models import layers


@functools.lru_cache(maxsize=None)
def _sample_images_224() -> np.ndarray:
  """scikit-learn's china.jpg and flower.jpg, resized to 224x224 bilinear, 0..255."""
  images = load_sample_images().images
  return np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR))
                   for im in images]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _lite0_top():
  spec = models.get("efficientnet_lite0", pretrained=True, include_top=True)
  apply = jax.jit(lambda v, x: spec.module.apply(v, x, train=False)["logits"])
  return spec, apply


def test_known_answer_efficientnet_lite0_sample_images():
  spec, apply = _lite0_top()
  x = transforms.normalize(_sample_images_224(), spec.mean, spec.std)
  logits = np.asarray(apply(spec.variables, x))
  assert logits.shape == (2, 1000)
  # china.jpg -> 442 'bell cote' (n02825657); flower.jpg -> 985 'daisy' (n11939491).
  np.testing.assert_array_equal(logits.argmax(-1), [442, 985])


def test_names_and_unknown_name():
  assert models.names() == ("efficientnet_lite0", "efficientnet_lite1",
                             "efficientnet_lite2", "resnet18", "resnet50", "small_cnn",
                             "squeezenet1_1")
  with pytest.raises(ValueError, match="known backbones: efficientnet_lite0, "
                     "efficientnet_lite1, efficientnet_lite2, resnet18"):
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
  assert sorted(spec.variables["params"]) == sorted(spec.blocks)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  # Shapes only (tracing, no compile): values are covered by the parity tests.
  out = jax.eval_shape(lambda v, x: spec.module.apply(v, x, train=False),
                       spec.variables, x)
  assert set(out) == set(spec.outputs)
  assert out["pooled"].shape == (2, spec.feature_dim)
  assert out["pooled"].dtype == jnp.float32
  assert out["map"].shape[0] == 2 and out["map"].shape[-1] == spec.feature_dim
  for k in spec.outputs[:-1]:
    assert out[k].ndim == 4 and out[k].shape[0] == 2, k
  out, updates = jax.eval_shape(
      lambda v, x: spec.module.apply(v, x, train=True, mutable=["batch_stats"]),
      spec.variables, x)
  assert out["pooled"].shape == (2, spec.feature_dim)
  assert (jax.tree.structure(dict(updates).get("batch_stats", {})) ==
          jax.tree.structure(spec.variables["batch_stats"]))


@pytest.mark.parametrize("name,size", [("small_cnn", 16), ("efficientnet_lite0", 64),
                                       ("squeezenet1_1", 64), ("resnet18", 64)])
def test_run_up_to_a_stage_and_continue_from_it(name, size):
  spec = models.get(name)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  apply = lambda x, **kw: spec.module.apply(spec.variables, x, train=False, **kw)  # noqa: E731
  full = apply(x)
  cut = spec.outputs[1]
  head = apply(x, stop=cut)
  assert list(head) == list(spec.outputs[:2])  # nothing after `cut` ran
  tail = apply(head[cut], start=cut)
  assert list(tail) == list(spec.outputs[2:])
  for k in spec.outputs:
    got = head[k] if k in head else tail[k]
    np.testing.assert_allclose(got, full[k], rtol=1e-5, atol=1e-5)
  # A middle piece alone, as sequential early exit runs it.
  mid = apply(head[cut], start=cut, stop="map")
  assert list(mid) == list(spec.outputs[2:-1])
  with pytest.raises(ValueError, match="outputs are stem"):
    apply(x, stop="stage9")
  with pytest.raises(ValueError, match="comes before"):
    apply(head[cut], start=cut, stop="stem")


def test_stop_before_the_head_builds_no_later_layers():
  spec = models.get("efficientnet_lite0")
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: spec.module.apply(v, x, stop="stage2"))(
      spec.variables, x)
  full = jax.make_jaxpr(lambda v, x: spec.module.apply(v, x))(spec.variables, x)
  assert len(str(jaxpr)) < 0.25 * len(str(full))


def test_small_cnn_train_mode_updates_batch_stats():
  spec = models.get("small_cnn")
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3)) * 3.0 + 1.0
  out, updates = jax.jit(lambda v, x: spec.module.apply(
      v, x, train=True, mutable=["batch_stats"]))(spec.variables, x)
  assert out["pooled"].shape == (4, 128)
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


def test_fold_batch_norm_same_outputs():
  spec = models.get("small_cnn")
  rng = np.random.default_rng(0)
  # Non-trivial statistics so the fold is actually exercised.
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32),
                       spec.variables["batch_stats"])
  variables = {"params": spec.variables["params"], "batch_stats": stats}
  x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  want = spec.module.apply(variables, x, train=False)["pooled"]
  folded = layers.fold_batch_norm(variables, spec.bn_epsilon)
  got = spec.module.clone(fold_bn=True).apply(folded, x, train=False)["pooled"]
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
  spec, apply = _lite0_top()
  net = ref_lib.EfficientNet.from_name("efficientnet-lite0")
  state = torch.load(efficientnet_lite.default_weights_path(), map_location="cpu",
                     weights_only=True)
  net.load_state_dict(state)
  net.eval()
  x = transforms.normalize(_sample_images_224(), spec.mean, spec.std)
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
  got = jax.jit(lambda v, x: spec.module.apply(v, x, train=False)["logits"])(
      spec.variables, x)
  _assert_logits_close(got, want)
  # The features (include_top=False) are the pooled input of the classifier.
  feats = models.get(name, pretrained=True, weights_path=path)
  assert "classifier" not in feats.variables["params"]


def _torch_grads(torch, net, features, x, names):
  """d mean(pooled features^2) / d (input, named params) in PyTorch, as NHWC/HWIO."""
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  features(xt).mean((2, 3)).pow(2).mean().backward()
  params = dict(net.named_parameters())
  return (xt.grad.numpy().transpose(0, 2, 3, 1),
          [params[n].grad.numpy().transpose(2, 3, 1, 0) for n in names])


def _jax_grads(spec, x, paths):
  def loss(params, x):
    out = spec.module.apply({**spec.variables, "params": params}, x, train=False)
    return jnp.mean(out["pooled"] ** 2)
  gp, gx = jax.jit(jax.grad(loss, (0, 1)))(spec.variables["params"], jnp.asarray(x))
  leaf = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)  # noqa: E731
  return np.asarray(gx), [np.asarray(leaf(gp, p)) for p in paths]


def _assert_grads_close(got, want):
  scale = np.abs(want).max()
  assert scale > 0
  assert np.abs(got - want).max() <= 1e-3 * scale, (np.abs(got - want).max(), scale)


def test_gradient_parity_efficientnet_lite0_vs_reference():
  # The CPU rewrites (custom-VJP depthwise, 1x1 as matmul) must give
  # PyTorch's gradients: input gradient plus the stem, a strided 5x5 depthwise and a 1x1
  # projection kernel. Eval-mode BN: the reference's train mode adds drop-connect noise.
  torch = pytest.importorskip("torch", reason="PyTorch parity needs torch")
  ref_lib = pytest.importorskip("efficientnet_lite_pytorch",
                                reason="reference implementation not installed")
  net = ref_lib.EfficientNet.from_name("efficientnet-lite0")
  net.load_state_dict(torch.load(efficientnet_lite.default_weights_path(),
                                 map_location="cpu", weights_only=True))
  net.eval()
  spec = models.get("efficientnet_lite0", pretrained=True)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  want_x, want = _torch_grads(torch, net, net.extract_features, x, [
      "_conv_stem.weight", "_blocks.3._depthwise_conv.weight",
      "_blocks.5._project_conv.weight"])
  got_x, got = _jax_grads(spec, x, [("stem", "conv", "kernel"),
                                    ("block3", "depthwise", "conv", "kernel"),
                                    ("block5", "project", "conv", "kernel")])
  _assert_grads_close(got_x, want_x)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    _assert_grads_close(g, w)


def test_gradient_parity_squeezenet_vs_torchvision(tmp_path):
  # Covers the max-pool VJP (PyTorch's first-maximum rule, ceil mode).
  torch = pytest.importorskip("torch", reason="PyTorch parity needs torch")
  tv = pytest.importorskip("torchvision", reason="PyTorch parity needs torchvision")
  torch.manual_seed(0)
  net = tv.models.squeezenet1_1(weights=None).eval()
  path = tmp_path / "squeezenet.pth"
  torch.save(net.state_dict(), path)
  spec = models.get("squeezenet1_1", pretrained=True, weights_path=path)
  x = np.random.default_rng(1).normal(size=(2, 67, 67, 3)).astype(np.float32)
  want_x, want = _torch_grads(torch, net, net.features, x, [
      "features.0.weight", "features.3.squeeze.weight", "features.12.expand3x3.weight"])
  got_x, got = _jax_grads(spec, x, [("conv1", "kernel"), ("fire3", "squeeze", "kernel"),
                                    ("fire12", "expand3x3", "kernel")])
  _assert_grads_close(got_x, want_x)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    _assert_grads_close(g, w)
