"""Fast CPU inference for the backbones: BN folding + shifted depthwise conv + fixed-batch jit.

Impostor networks exist to make light ConvNets accurate *and fast on CPU* (impostor
networks paper, sections 1 and 4.1). On XLA:CPU the two things that matter for
EfficientNet-Lite0 are (i) depthwise convolutions, which XLA lowers to a slow grouped
convolution; we compute them as k*k shifted multiply-adds that XLA fuses into one loop
(layers.depthwise_conv_shifted), and (ii) BatchNorm, which we fold into the preceding
convolution (layers.fold_batch_norm), removing a pass over every activation. The
predictor compiles once for a fixed batch size and pads the last partial batch, so
serving never recompiles.

  spec = fgjax.models.get('efficientnet_lite0', pretrained=True)
  predict = make_cpu_predictor(spec, batch_size=32)
  feats = predict(images)  # (N, 224, 224, 3) normalised float32 -> (N, 1280) np.ndarray
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from fgjax.models import layers
from fgjax.models import xla_cpu


def fold(module: nn.Module, variables: dict[str, Any],
         bn_epsilon: Optional[float]) -> tuple[nn.Module, dict[str, Any]]:
  """The inference-only twin of a backbone: BN folded, depthwise as shifted MACs.

  Args:
    module: a registry backbone (has `fold_bn` and `conv_impl` attributes).
    variables: its {'params', 'batch_stats'}.
    bn_epsilon: the backbone's BN epsilon (spec.bn_epsilon); None if it has no BN.

  Returns:
    (module with fold_bn=True and conv_impl='shifted', {'params': folded}).
  """
  if not (hasattr(module, "fold_bn") and hasattr(module, "conv_impl")):
    raise TypeError(f"{type(module).__name__} is not a fgjax.models backbone (it has no "
                    "fold_bn / conv_impl attributes); pass fold_bn=False.")
  if variables.get("batch_stats"):
    if bn_epsilon is None:
      raise ValueError("variables have batch_stats but bn_epsilon is None.")
    folded = layers.fold_batch_norm(variables, bn_epsilon)
  else:
    folded = {"params": variables["params"]}
  folded = jax.tree.map(jnp.asarray, folded)
  return module.clone(fold_bn=True, conv_impl="shifted"), folded


def _resolve(spec_or_module: Any, variables: Optional[dict[str, Any]], batch_size: int,
             bn_epsilon: Optional[float]) -> tuple[nn.Module, dict[str, Any],
                                                   Optional[float]]:
  """(module, variables, bn_epsilon) from a ModelSpec or a module, with checks."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  module = getattr(spec_or_module, "module", spec_or_module)
  if variables is None:
    if not hasattr(spec_or_module, "variables"):
      raise ValueError("pass `variables` when giving a module instead of a ModelSpec.")
    variables = spec_or_module.variables
  if bn_epsilon is None:
    bn_epsilon = getattr(spec_or_module, "bn_epsilon", None)
  return module, variables, bn_epsilon


def make_cpu_predictor(spec_or_module: Any, variables: Optional[dict[str, Any]] = None,
                       batch_size: int = 32, *, bn_epsilon: Optional[float] = None,
                       fold_bn: bool = True,
                       device: Optional[jax.Device] = None,
                       engine: str = "xla") -> Callable[[Any], np.ndarray]:
  """Returns predict(images) -> np.ndarray running the backbone in eval mode on CPU.

  Args:
    spec_or_module: a `fgjax.models.ModelSpec`, or a flax module (then pass
      `variables`, and `bn_epsilon` if it has BatchNorm).
    variables: {'params', 'batch_stats'}; defaults to spec.variables.
    batch_size: the compiled batch size; inputs are processed in chunks of this size
      (the last one zero-padded), so any N works without recompiling.
    bn_epsilon: BN epsilon for folding; defaults to spec.bn_epsilon.
    fold_bn: fold BN into convolutions (registry backbones only).
    device: where to run; default the first CPU device.
    engine: 'xla' (jit on `device`) or 'onnx' (the `make_onnx_predictor` export run by
      onnxruntime on the host CPU; needs `onnx` + `onnxruntime`, fold_bn=True and no
      `device`). On a 2-core CPU 'onnx' was 1.7-2.4x faster than 'xla' for
      EfficientNet-Lite0 / SqueezeNet at batch 1 and 32 (BENCHMARKS.md section 3).

  Returns:
    predict(images): images (N, H, W, 3) float32, normalised like spec.mean/std ->
    (N, ...) outputs of module.apply(variables, images, train=False), as NumPy.
  """
  if engine not in ("xla", "onnx"):
    raise ValueError(f"engine must be 'xla' or 'onnx', got {engine!r}.")
  if engine == "onnx":
    if not fold_bn or device is not None:
      raise ValueError("engine='onnx' always folds BN and runs on the host CPU; leave "
                       "fold_bn=True and device=None, or use engine='xla'.")
    return make_onnx_predictor(spec_or_module, variables, batch_size,
                               bn_epsilon=bn_epsilon)
  module, variables, bn_epsilon = _resolve(spec_or_module, variables, batch_size,
                                           bn_epsilon)
  if fold_bn:
    module, variables = fold(module, variables, bn_epsilon)
  device = device or jax.devices("cpu")[0]
  variables = jax.device_put(variables, device)
  forward = jax.jit(lambda v, x: module.apply(v, x, train=False),
                    compiler_options=xla_cpu.compiler_options(device.platform))

  def predict(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"predict expects (N, H, W, 3) images, got {images.shape}.")
    if not np.issubdtype(images.dtype, np.floating):
      raise TypeError(f"predict expects normalised float images, got {images.dtype}.")
    images = images.astype(np.float32, copy=False)
    n = images.shape[0]
    outs = []
    for start in range(0, n, batch_size):
      chunk = images[start:start + batch_size]
      if chunk.shape[0] < batch_size:
        pad = np.zeros((batch_size - chunk.shape[0],) + chunk.shape[1:], np.float32)
        chunk = np.concatenate([chunk, pad])
      out = forward(variables, jax.device_put(chunk, device))
      outs.append(np.asarray(out)[:min(batch_size, n - start)])
    if not outs:
      raise ValueError("predict got an empty batch.")
    return np.concatenate(outs)

  return predict


# ------------------------------------------------------------- ONNX Runtime export

# Logical NHWC axis -> axis of the NCHW tensor ONNX stores for 4-D values.
_NHWC_TO_NCHW_AXIS = (0, 2, 3, 1)


def to_onnx(module: nn.Module, variables: dict[str, Any],
            input_shape: tuple[int, int, int, int]) -> Any:
  """Exports `module.apply(variables, x, train=False)` to an onnx.ModelProto.

  The jaxpr of the (BN-folded) forward is translated primitive by primitive; every 4-D
  value is stored NCHW on the ONNX side (one Transpose at the input), so convolutions and
  pooling map to ONNX Conv / MaxPool directly. Supports the primitives the registry
  backbones use in eval mode (conv, elementwise add/max/min/div, broadcast of constants,
  reduce_sum, reduce_window_max, concatenate, dot_general); anything else raises
  NotImplementedError naming the primitive.

  Args:
    module: flax module; variables: its variables (closed over as initializers).
    input_shape: static (N, H, W, 3) input shape.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top

  closed = jax.make_jaxpr(lambda x: module.apply(variables, x, train=False))(
      jax.ShapeDtypeStruct(input_shape, jnp.float32))
  nodes = []
  consts: dict[str, np.ndarray] = {}
  spatial_sums: dict[str, int] = {}  # ReduceSum over H, W -> H * W
  env: dict[Any, Any] = {}  # jaxpr var -> ONNX name, or np.ndarray for constants
  counter = [0]

  def fresh(prefix="t"):
    counter[0] += 1
    return f"{prefix}{counter[0]}"

  def const_name(value: np.ndarray) -> str:
    name = fresh("c")
    consts[name] = np.asarray(value)
    return name

  def read(atom):
    if isinstance(atom, jax_core.Literal):
      return np.asarray(atom.val, np.float32)
    return env[atom]

  def name_of(atom):
    v = read(atom)
    return const_name(v) if isinstance(v, np.ndarray) else v

  def to_physical(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (0, 3, 1, 2)) if value.ndim == 4 else value

  def node(op, inputs, **attrs):
    out = fresh()
    nodes.append(helper.make_node(op, inputs, [out], **attrs))
    return out

  def run(jaxpr, args):
    for var, val in zip(jaxpr.invars, args):
      env[var] = val
    for eqn in jaxpr.eqns:
      prim, p = eqn.primitive.name, eqn.params
      ins = eqn.invars
      if prim in ("jit", "pjit", "custom_jvp_call", "custom_vjp_call"):
        sub = p.get("jaxpr", p.get("call_jaxpr"))
        sub = getattr(sub, "jaxpr", sub)
        consts = getattr(p.get("jaxpr", p.get("call_jaxpr")), "consts", [])
        for cv, c in zip(sub.constvars, consts):
          env[cv] = np.asarray(c)
        outs = run(sub, [read(a) for a in ins])
        for var, val in zip(eqn.outvars, outs):
          env[var] = val
        continue
      args_ = [read(a) for a in ins]
      if all(isinstance(a, np.ndarray) for a in args_) and prim != "conv_general_dilated":
        # Constant folding on the host (logical layout), e.g. bias broadcasts.
        out = eqn.primitive.bind(*[jnp.asarray(a) for a in args_], **p)
        env[eqn.outvars[0]] = np.asarray(out)
        continue
      if prim == "convert_element_type":
        env[eqn.outvars[0]] = args_[0]
      elif prim == "broadcast_in_dim":
        raise NotImplementedError("broadcast_in_dim of a non-constant value")
      elif prim in ("add", "max", "min", "div", "mul", "sub"):
        op = {"add": "Add", "max": "Max", "min": "Min", "div": "Div", "mul": "Mul",
              "sub": "Sub"}[prim]
        names = [const_name(to_physical(a).astype(np.float32))
                 if isinstance(a, np.ndarray) else a for a in args_]
        env[eqn.outvars[0]] = node(op, names)
      elif prim == "conv_general_dilated":
        dn = p["dimension_numbers"]
        if (tuple(dn.lhs_spec), tuple(dn.rhs_spec)) != ((0, 3, 1, 2), (3, 2, 0, 1)):
          raise NotImplementedError(f"conv layout {dn}")
        if any(d != 1 for d in tuple(p["lhs_dilation"]) + tuple(p["rhs_dilation"])):
          raise NotImplementedError("dilated conv")
        kernel = np.transpose(np.asarray(args_[1]), (3, 2, 0, 1))  # HWIO -> OIHW
        (t, b), (l, r) = p["padding"]
        env[eqn.outvars[0]] = node(
            "Conv", [args_[0], const_name(kernel)], group=int(p["feature_group_count"]),
            strides=list(p["window_strides"]), pads=[t, l, b, r],
            kernel_shape=list(kernel.shape[2:]))
      elif prim == "reduce_sum":
        axes = [_NHWC_TO_NCHW_AXIS[a] for a in p["axes"]] if ins[0].aval.ndim == 4 \
            else list(p["axes"])
        env[eqn.outvars[0]] = node("ReduceSum", [args_[0], const_name(
            np.asarray(axes, np.int64))], keepdims=0)
        if sorted(axes) == [2, 3]:
          spatial_sums[env[eqn.outvars[0]]] = int(np.prod(ins[0].aval.shape[1:3]))
      elif prim == "reduce_window_max":
        win, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
        if win[0] != 1 or win[3] != 1 or any(d != 1 for d in p["base_dilation"]):
          raise NotImplementedError("reduce_window_max over batch/channels")
        env[eqn.outvars[0]] = node(
            "MaxPool", [args_[0]], kernel_shape=list(win[1:3]),
            strides=list(strides[1:3]),
            pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]])
      elif prim == "concatenate":
        axis = p["dimension"]
        if eqn.outvars[0].aval.ndim == 4:
          axis = _NHWC_TO_NCHW_AXIS[axis]
        env[eqn.outvars[0]] = node("Concat", [name_of(a) for a in ins], axis=axis)
      elif prim == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        if tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb or ins[0].aval.ndim != 2:
          raise NotImplementedError(f"dot_general {p['dimension_numbers']}")
        env[eqn.outvars[0]] = node("MatMul", [args_[0], name_of(ins[1])])
      else:
        raise NotImplementedError(f"ONNX export: primitive '{prim}' is not supported.")
    return [read(v) for v in jaxpr.outvars]

  for cv, c in zip(closed.jaxpr.constvars, closed.consts):
    env[cv] = np.asarray(c)
  x_nchw = node("Transpose", ["images"], perm=[0, 3, 1, 2])
  outs = run(closed.jaxpr, [x_nchw])
  out_vals = []
  for i, (var, val) in enumerate(zip(closed.jaxpr.outvars, outs)):
    name = f"output{i}"
    if var.aval.ndim == 4:
      nodes.append(helper.make_node("Transpose", [val], [name], perm=[0, 2, 3, 1]))
    else:
      nodes.append(helper.make_node("Identity", [val], [name]))
    out_vals.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                  list(var.aval.shape)))
  nodes = _fuse(nodes, consts, spatial_sums, [o.name for o in out_vals])
  used = {i for n in nodes for i in n.input}
  inits = [numpy_helper.from_array(v, k) for k, v in consts.items() if k in used]
  graph = helper.make_graph(
      nodes, "fgjax", [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                                     list(input_shape))],
      out_vals, inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scalar(consts: dict[str, np.ndarray], name: str) -> Optional[float]:
  """The value of a constant that is one number (any shape of size 1), else None."""
  v = consts.get(name)
  return float(v.reshape(())) if v is not None and v.size == 1 else None


def _fuse(nodes: list[Any], consts: dict[str, np.ndarray], spatial_sums: dict[str, int],
          outputs: list[str]) -> list[Any]:
  """Rewrites the literal jaxpr translation into the ops onnxruntime fuses.

  The jaxpr of a BN-folded conv + ReLU6 is conv, add(bias), max(0), min(6); onnxruntime
  only fuses an activation into Conv (and into its NCHWc kernels) when the bias is Conv's
  third input and the activation is a Relu / Clip node. Rewrites, each only when the
  intermediate value has a single consumer (so no other node sees a changed value):
    Conv(x, W) -> Add(per-channel const)      => Conv(x, W, B)
    Max(x, 0)                                 => Relu(x)
    Relu(x) -> Min(x, c)                      => Clip(x, 0, c)
    MatMul(x, W) -> Add(const row)            => Gemm(x, W, b)
    ReduceSum(x, [2, 3]) -> Div(H * W)        => GlobalAveragePool(x) -> Flatten
  These are exact rewrites (same arithmetic up to float summation order).
  """
  from onnx import helper  # pylint: disable=g-import-not-at-top

  def consumers(nodes):
    count: dict[str, int] = {o: 1 for o in outputs}
    for n in nodes:
      for i in n.input:
        count[i] = count.get(i, 0) + 1
    return count

  def fresh(base):
    k = 0
    while f"{base}_{k}" in consts:
      k += 1
    return f"{base}_{k}"

  def add_const(base, value):
    name = fresh(base)
    consts[name] = np.asarray(value)
    return name

  def other(n, name):
    """The input of binary node n that is not `name`."""
    a, b = n.input
    return b if a == name else a

  # Pass 1: pairwise fusions of a producer with its single consumer.
  count = consumers(nodes)
  producer = {n.output[0]: n for n in nodes}
  replaced: dict[int, Any] = {}  # id(node) -> new node, or None to drop
  for n in nodes:
    if id(n) in replaced or n.op_type != "Add" or len(n.input) != 2:
      continue
    for src in n.input:
      prev = producer.get(src)
      if prev is None or count.get(src) != 1 or id(prev) in replaced:
        continue
      c = consts.get(other(n, src))
      if prev.op_type == "Conv" and len(prev.input) == 2 and c is not None:
        channels = consts[prev.input[1]].shape[0]
        if c.size == channels and c.ndim <= 4 and c.reshape(-1).shape == (channels,) \
            and (c.ndim < 3 or c.shape[-1] == c.shape[-2] == 1):
          bias = add_const(prev.input[1] + "_b", c.reshape(-1).astype(np.float32))
          attrs = {a.name: helper.get_attribute_value(a) for a in prev.attribute}
          replaced[id(prev)] = None
          replaced[id(n)] = helper.make_node(
              "Conv", [prev.input[0], prev.input[1], bias], [n.output[0]], **attrs)
          break
      if prev.op_type == "MatMul" and c is not None and c.ndim <= 2 and \
          consts.get(prev.input[1]) is not None and consts[prev.input[1]].ndim == 2 and \
          c.size == consts[prev.input[1]].shape[1]:
        bias = add_const(prev.input[1] + "_b", c.reshape(-1).astype(np.float32))
        replaced[id(prev)] = None
        replaced[id(n)] = helper.make_node(
            "Gemm", [prev.input[0], prev.input[1], bias], [n.output[0]])
        break
  nodes = [replaced.get(id(n), n) for n in nodes]
  nodes = [n for n in nodes if n is not None]

  # Pass 2: activations and the global average pool.
  out = []
  for n in nodes:
    if n.op_type == "Max" and len(n.input) == 2:
      for src in n.input:
        if _scalar(consts, other(n, src)) == 0.0 and src not in consts:
          n = helper.make_node("Relu", [src], [n.output[0]])
          break
    out.append(n)
  nodes, out = out, []
  count, producer = consumers(nodes), {n.output[0]: n for n in nodes}
  dropped = set()
  for n in nodes:
    if n.op_type in ("Min", "Div") and len(n.input) == 2:
      src = n.input[0] if n.op_type == "Div" else next(
          (i for i in n.input if i not in consts), None)
      prev = producer.get(src)
      c = _scalar(consts, other(n, src)) if src is not None else None
      if prev is not None and c is not None and count.get(src) == 1:
        if n.op_type == "Min" and prev.op_type == "Relu" and c >= 0.0:
          dropped.add(id(prev))
          n = helper.make_node("Clip", [prev.input[0], add_const("clip_lo", np.float32(0)),
                                        add_const("clip_hi", np.float32(c))],
                               [n.output[0]])
        elif (n.op_type == "Div" and prev.op_type == "ReduceSum" and
              spatial_sums.get(src) == c):
          dropped.add(id(prev))
          pooled = src + "_gap"
          out.append(helper.make_node("GlobalAveragePool", [prev.input[0]], [pooled]))
          n = helper.make_node("Flatten", [pooled], [n.output[0]], axis=1)
    out.append(n)
  return [n for n in out if id(n) not in dropped]


def make_onnx_predictor(spec_or_module: Any, variables: Optional[dict[str, Any]] = None,
                        batch_size: int = 32, *, bn_epsilon: Optional[float] = None,
                        threads: int = 2) -> Callable[[Any], np.ndarray]:
  """Like make_cpu_predictor, but runs an ONNX export of the network in onnxruntime.

  Optional dependency: `onnx` and `onnxruntime`. The export (`to_onnx`, BN folded,
  depthwise as group Conv, bias in Conv / Relu / Clip so onnxruntime fuses them) is built
  per input spatial size on first use and run with ORT_ENABLE_ALL, `threads` intra-op
  threads. Same arguments and outputs as make_cpu_predictor.
  """
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  module, variables, bn_epsilon = _resolve(spec_or_module, variables, batch_size,
                                           bn_epsilon)
  module, variables = fold(module, variables, bn_epsilon)
  module = module.clone(conv_impl="lax")  # ONNX Conv(group=C)
  sessions = {}

  def session(hw):
    if hw not in sessions:
      model = to_onnx(module, variables, (batch_size,) + hw + (3,))
      opts = ort.SessionOptions()
      opts.intra_op_num_threads = threads
      opts.inter_op_num_threads = 1
      opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
      sessions[hw] = ort.InferenceSession(model.SerializeToString(), opts,
                                          providers=["CPUExecutionProvider"])
    return sessions[hw]

  def predict(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"predict expects (N, H, W, 3) images, got {images.shape}.")
    if not np.issubdtype(images.dtype, np.floating):
      raise TypeError(f"predict expects normalised float images, got {images.dtype}.")
    images = images.astype(np.float32, copy=False)
    sess = session(images.shape[1:3])
    outs = []
    for start in range(0, images.shape[0], batch_size):
      chunk = images[start:start + batch_size]
      n = chunk.shape[0]
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:],
                                                np.float32)])
      outs.append(sess.run(None, {"images": chunk})[0][:n])
    if not outs:
      raise ValueError("predict got an empty batch.")
    return np.concatenate(outs)

  return predict
