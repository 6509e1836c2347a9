"""fgjax.export: the CPU engines ('xla', 'onnx') give the jit path's outputs for every
registered network, and 'onnx' refuses what it cannot translate at build time."""

import importlib.util
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fgjax import export
from fgjax import models
from fgjax.export import onnx as onnx_export
from fgjax.export import onnx_fusion
from fgjax.models import nets
from fgjax.models import pooling

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX,
                                reason="the ONNX engine needs onnx and onnxruntime")
ENGINES = ("xla", "onnx") if HAVE_ONNX else ("xla",)


def _assert_close(got, want, rel=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= rel * np.abs(want).max()


def _perturbed(variables, seed=0):
  """variables with BN statistics / scales, biases and pooling weights moved off their
  init values, so BN folding and every head does real arithmetic."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = np.shape(x)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
    if name in ("scale", "weights"):
      return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    if name in ("mean", "bias"):
      return jnp.asarray(rng.normal(0.0, 0.1, shape), jnp.float32)
    return x

  return jax.tree_util.tree_map_with_path(leaf, dict(variables))


def _network(net, pool, backbone="small_cnn", pretrained=False, k=2):
  cfg = common.get_config().model
  cfg.update(dict(backbone=backbone, pretrained=pretrained, net=net, pooling=pool,
                  pooling_k=k, embed_dim=16, localizer_stop="stem", localizer_size=8,
                  localizer_map_size=4, exit_stages=("stage1", "map")))
  return nets.build(cfg, num_classes=5)


def _jit_outputs(module, variables, x):
  return jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)


@pytest.mark.parametrize("pool", pooling.names())
# The attention networks ignore config.model.pooling; tests/test_bap.py and
# tests/test_coarse2fine.py check their engines (c2f's fine modes: XLA only).
@pytest.mark.parametrize("net", [n for n in nets.names()
                                 if n not in ("bap", "bap_impostor", "c2f")])
def test_every_network_and_pooling_matches_jit(net, pool):
  network = _network(net, pool)
  variables = _perturbed(network.init(0, 16))
  x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  names = ("embedding", "logits") if network.has_logits else ("embedding",)
  if net == "convnet_exits":  # the exit heads are served by every engine too
    names += ("exit_logits",)
  want = _jit_outputs(network.module, variables, x)
  for engine in ENGINES:
    predict = export.make_cpu_predictor(network.module, variables, 2, outputs=names,
                                        bn_epsilon=network.spec.bn_epsilon,
                                        engine=engine, image_size=16)
    got = predict(x)  # two chunks, the second one padded
    assert set(got) == set(names), engine
    for k in names:
      assert isinstance(got[k], np.ndarray) and got[k].dtype == np.float32
      _assert_close(got[k], want[k])
    _assert_close(predict(x[2:])["embedding"], np.asarray(want["embedding"])[2:])


def test_lite0_kmax_network_both_engines():
  network = _network("impostor", "kmax", "efficientnet_lite0", pretrained=True, k=2)
  variables = network.init(0, 48)
  x = np.random.default_rng(2).normal(size=(3, 48, 48, 3)).astype(np.float32)
  want = _jit_outputs(network.module, variables, x)
  for engine in ENGINES:
    got = export.make_cpu_predictor(network, variables, 2,
                                    outputs=("embedding", "features"),
                                    engine=engine)(x)
    _assert_close(got["embedding"], want["embedding"])
    _assert_close(got["features"], want["features"])


@pytest.mark.parametrize("name,size,pretrained", [("efficientnet_lite0", 40, True),
                                                  ("small_cnn", 16, False)])
def test_backbone_spec_matches_module(name, size, pretrained):
  spec = models.get(name, pretrained=pretrained)
  x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
  want = _jit_outputs(spec.module, spec.variables, x)
  predict = export.make_cpu_predictor(spec, batch_size=2, outputs=("pooled",))
  got = predict(x)
  assert list(got) == ["pooled"] and got["pooled"].shape == (3, spec.feature_dim)
  _assert_close(got["pooled"], want["pooled"])
  _assert_close(predict(x[:1])["pooled"], np.asarray(want["pooled"])[:1])


def test_fold_changes_structure_not_function():
  spec = models.get("small_cnn")
  module, folded = export.fold(spec.module, spec.variables, spec.bn_epsilon)
  assert module.fold_bn and "batch_stats" not in folded
  assert set(folded["params"]["stage0"]) == {"conv"}
  assert set(folded["params"]["stage0"]["conv"]) == {"kernel", "bias"}
  with pytest.raises(ValueError, match="train=False"):
    module.apply(folded, np.zeros((1, 8, 8, 3), np.float32), train=True)
  # A network: the backbone is folded, the heads (and the pooling's weights) kept.
  network = _network("convnet_extra", "weighted_kmax")
  variables = _perturbed(network.init(0, 16))
  net_module, net_folded = export.fold(network.module, variables,
                                       network.spec.bn_epsilon)
  assert net_module.backbone.fold_bn and net_module.backbone.conv_impl == "shifted"
  assert not network.module.backbone.fold_bn
  assert set(net_folded["params"]["backbone"]["stage0"]) == {"conv"}
  for head in ("embed", "classifier", "pool"):
    for a, b in zip(jax.tree.leaves(net_folded["params"][head]),
                    jax.tree.leaves(variables["params"][head]), strict=True):
      np.testing.assert_array_equal(a, b)
  x = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  want = network.module.apply(variables, x, train=False)
  got = net_module.apply(net_folded, x, train=False)
  _assert_close(got["logits"], want["logits"])
  with pytest.raises(TypeError, match="BN-folded"):
    export.fold(nn.Dense(3), {"params": {}}, None)


def test_predictor_input_errors():
  spec = models.get("small_cnn")
  predict = export.make_cpu_predictor(spec, batch_size=4, outputs=("pooled",))
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    predict(np.zeros((2, 3, 8, 8), np.float32))
  with pytest.raises(TypeError, match="float"):
    predict(np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    predict(np.zeros((0, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="batch_size"):
    export.make_cpu_predictor(spec, batch_size=0, outputs=("pooled",))
  with pytest.raises(ValueError, match="variables"):
    export.make_cpu_predictor(spec.module, outputs=("pooled",))
  with pytest.raises(ValueError, match="no output.*'embedding'.*outputs are stem"):
    export.make_cpu_predictor(spec, outputs=("embedding",))
  with pytest.raises(ValueError, match="outputs must name"):
    export.make_cpu_predictor(spec, outputs=())
  with pytest.raises(ValueError, match="engine"):
    export.make_cpu_predictor(spec, outputs=("pooled",), engine="tflite")
  with pytest.raises(ValueError, match="device"):
    export.make_cpu_predictor(spec, outputs=("pooled",), engine="onnx",
                              device=jax.devices("cpu")[0])
  with pytest.raises(ValueError, match="bn_epsilon"):
    export.make_cpu_predictor(spec.module, spec.variables, outputs=("pooled",))


class _CumSum(nn.Module):
  """A module with a primitive ('cumsum') the ONNX translation has no rule for."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Dense(4, name="proj")(x.mean((1, 2)))
    return {"ok": y, "cumulative": jnp.cumsum(y, axis=-1)}


@needs_onnx
def test_onnx_refuses_unsupported_primitive_at_build_time():
  module = _CumSum()
  x = np.random.default_rng(4).normal(size=(3, 8, 8, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(export.OnnxExportError,
                     match=r"_CumSum.*primitive 'cumsum'.*engine='xla'") as err:
    export.make_cpu_predictor(module, variables, 2, outputs=("cumulative",),
                              engine="onnx", image_size=8)
  assert isinstance(err.value, ValueError)
  assert err.value.__cause__.primitive == "cumsum"
  with pytest.raises(onnx_export.UnsupportedPrimitive, match="cumsum"):
    onnx_export.to_onnx(module, variables, (2, 8, 8, 3), ("cumulative",))
  # Only what the requested outputs need is translated; 'xla' serves everything.
  want = module.apply(variables, x)
  got = export.make_cpu_predictor(module, variables, 2, outputs=("ok",),
                                  engine="onnx", image_size=8)(x)
  _assert_close(got["ok"], want["ok"])
  got = export.make_cpu_predictor(module, variables, 2, outputs=("cumulative",),
                                  image_size=8)(x)
  _assert_close(got["cumulative"], want["cumulative"])


class _LayoutOps(nn.Module):
  """Ops that are not layout-aware, on NCHW-stored maps (the next poolings' shapes)."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Conv(8, (3, 3), name="conv")(x)
    n, h, w, _ = y.shape
    att = nn.Conv(4, (1, 1), name="att")(y).reshape(n, h * w, 4)
    att = jax.nn.softmax(att, axis=1).reshape(n, h, w, 4)
    return {
        "attention": jnp.einsum("nhwm,nhwc->nmc", att, y),
        "max_h": jnp.max(y, axis=1),
        "transposed": jnp.transpose(y, (0, 2, 1, 3))[:, ::2],
        "sorted": jax.lax.sort(y.reshape(n, -1), dimension=1),
        "select": jnp.where(y > 0, y, -0.5 * y) ** 3,
        "squeezed": jnp.squeeze(y[:, :1], 1),
        "argmax": jnp.argmax(y, -1),
        "padded": jnp.pad(y, ((0, 0), (1, 2), (0, 0), (0, 0))),
        "concat": jnp.concatenate(
            [y, jnp.broadcast_to(jnp.mean(y, (1, 2), keepdims=True), y.shape)], -1),
        "unary": jax.lax.rsqrt(jnp.abs(y) + 1) - jnp.log(jnp.exp(-y) + 1),
        "topk": jax.lax.top_k(jnp.transpose(y, (0, 3, 1, 2)).reshape(n, 8, -1), 3)[0],
    }


@needs_onnx
def test_onnx_translates_ops_that_are_not_layout_aware():
  module = _LayoutOps()
  x = np.random.default_rng(5).normal(size=(3, 6, 5, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), x)
  want = module.apply(variables, x)
  got = export.make_cpu_predictor(module, variables, 2, outputs=tuple(want),
                                  engine="onnx", image_size=(6, 5))(x)
  for k in want:
    if k == "argmax":
      np.testing.assert_array_equal(got[k], want[k])
    else:
      _assert_close(got[k], want[k])
  # 'nhwm,nhwc->nmc' on NCHW-stored maps: the attention map is already (N, M, H*W).
  model = onnx_export.to_onnx(module, variables, (2, 6, 5, 3), ("attention",))
  ops = [n.op_type for n in model.graph.node]
  assert ops.count("MatMul") == 1 and ops.count("Transpose") <= 4


def _relayouts(y, perm, xp):
  """y transposed by `perm`, then reshaped / reduced (computed with `xp`: jnp or np)."""
  t = xp.transpose(y, perm)
  d = t.shape
  shapes = {"same": d, "flat": (-1,), "rows": (d[0], -1), "pairs": (d[0] * d[1], -1),
            "middle": (d[0], d[1] * d[2], d[3]), "lead1": (1,) + d,
            "mid1": d[:2] + (1,) + d[2:], "tail1": (d[0], d[1], d[2] * d[3], 1)}
  out = {k: xp.reshape(t, v) for k, v in shapes.items()}
  out.update({f"sum{a}": xp.sum(t, a) for a in ((1,), (0, 2), (1, 2, 3))})
  out["centred"] = t - xp.max(t, (1, 3), keepdims=True)
  out["map"] = y  # y and t are one stored tensor, returned in two orders
  return out


class _Relayout(nn.Module):
  """A conv map (stored NCHW in the export) through `_relayouts`."""
  perm: tuple

  @nn.compact
  def __call__(self, x, train=False):
    return _relayouts(nn.Conv(4, (1, 1), name="conv")(x), self.perm, jnp)


@needs_onnx
@pytest.mark.parametrize("shape", [(2, 3, 1, 3), (1, 2, 3, 3)])
def test_onnx_reshape_and_reduce_in_every_stored_layout(shape):
  x = np.random.default_rng(6).normal(size=shape).astype(np.float32)
  variables = _Relayout((0, 1, 2, 3)).init(jax.random.key(0), x)
  conv = variables["params"]["conv"]
  y = x @ np.asarray(conv["kernel"])[0, 0] + np.asarray(conv["bias"])
  for perm in itertools.permutations(range(4)):
    want = _relayouts(y, perm, np)
    model = onnx_export.to_onnx(_Relayout(perm), variables, shape, tuple(want))
    got = onnx_export.session(model, 1).run(None, {"images": x})
    for g, k in zip(got, want):
      assert g.shape == want[k].shape, (perm, k)
      np.testing.assert_allclose(g, want[k], rtol=1e-5, atol=1e-5, err_msg=str(perm))


@needs_onnx
@pytest.mark.parametrize("name,pretrained,top", [("efficientnet_lite0", True, True),
                                                 ("squeezenet1_1", False, False)])
def test_onnx_predictor_matches_module(name, pretrained, top):
  spec = models.get(name, pretrained=pretrained, include_top=top)
  x = np.random.default_rng(0).normal(size=(3, 48, 48, 3)).astype(np.float32)
  want = _jit_outputs(spec.module, spec.variables, x)
  names = ("logits", "pooled") if top else ("pooled", "map")
  got = export.make_cpu_predictor(spec, batch_size=2, outputs=names, engine="onnx")(x)
  for k in names:
    _assert_close(got[k], want[k])


@needs_onnx
@pytest.mark.parametrize("name,activation,count", [("efficientnet_lite0", "Clip", 33),
                                                   ("squeezenet1_1", "Relu", 26)])
def test_onnx_export_emits_fusable_ops(name, activation, count):
  # onnxruntime fuses Conv + activation only for Conv-with-bias followed by Relu / Clip.
  import onnx  # pylint: disable=g-import-not-at-top
  spec = models.get(name, include_top=True)
  module, folded = export.fold(spec.module, spec.variables, spec.bn_epsilon, "lax")
  model = export.to_onnx(module, folded, (1, 32, 32, 3), ("logits",))
  onnx.checker.check_model(model)
  ops = [n.op_type for n in model.graph.node]
  assert ops.count(activation) == count
  assert not {"Max", "Min", "MatMul", "ReduceSum", "Div"} & set(ops)
  convs = [n for n in model.graph.node if n.op_type == "Conv"]
  assert convs and all(len(n.input) == 3 for n in convs)
  assert ops.count("GlobalAveragePool") == 1 and ops.count("Gemm") == int(
      name == "efficientnet_lite0")
  # Only the residual adds of the inverted-bottleneck blocks stay Add (Lite0: 9).
  assert ops.count("Add") == (9 if name == "efficientnet_lite0" else 0)
  assert ops.count("Transpose") == 1  # the input, NHWC -> NCHW
  clip = next((n for n in model.graph.node if n.op_type == "Clip"), None)
  if clip is not None:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert (float(inits[clip.input[1]]), float(inits[clip.input[2]])) == (0.0, 6.0)


@needs_onnx
def test_onnx_kmax_pooling_adds_no_transpose():
  # GKMP on the NCHW map: Reshape to (N, C, H*W) and TopK on the last axis.
  network = _network("impostor", "kmax")
  module, folded = export.fold(network.module, network.init(0, 16),
                               network.spec.bn_epsilon, "lax")
  model = export.to_onnx(module, folded, (2, 16, 16, 3), ("embedding",))
  ops = [n.op_type for n in model.graph.node]
  assert ops.count("Transpose") == 1 and ops.count("TopK") == 1
  topk = next(n for n in model.graph.node if n.op_type == "TopK")
  attrs = {a.name: a.i for a in topk.attribute}
  assert attrs == {"axis": 2, "largest": 1, "sorted": 1}


@needs_onnx
def test_fuse_leaves_shared_values_alone():
  # A value with a second consumer (here: also a graph output) must not be fused away.
  from onnx import helper  # pylint: disable=g-import-not-at-top
  consts = {"w": np.ones((4, 3, 1, 1), np.float32), "b": np.ones((1, 4, 1, 1), np.float32),
            "zero": np.float32(0), "six": np.float32(6)}
  nodes = [helper.make_node("Conv", ["x", "w"], ["conv"]),
           helper.make_node("Add", ["conv", "b"], ["biased"]),
           helper.make_node("Max", ["zero", "biased"], ["relu"]),
           helper.make_node("Min", ["six", "relu"], ["out"])]
  fused = onnx_fusion.fuse(list(nodes), dict(consts), {}, ["out"])
  assert [n.op_type for n in fused] == ["Conv", "Clip"]
  assert list(fused[0].input)[:2] == ["x", "w"] and len(fused[0].input) == 3
  kept = onnx_fusion.fuse(list(nodes), dict(consts), {}, ["out", "conv", "relu"])
  assert [n.op_type for n in kept] == ["Conv", "Add", "Relu", "Min"]
