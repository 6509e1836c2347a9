"""jaxpr -> ONNX nodes: the primitive-by-primitive translation behind fgjax.export.onnx.

Layouts. Every translated value carries a permutation `perm`: physical axis i of the
ONNX tensor holds logical (jax) axis perm[i]. The input images are transposed once to
NCHW (perm (0, 3, 1, 2)), so convolutions and pooling map to ONNX Conv / MaxPool on the
tensors as they are. Layout-aware ops keep whatever layout their operand has:
elementwise ops (constants are transposed on the host to match), reductions (the reduced
axes are mapped, the result's perm is what remains), squeeze, slice, pad, concatenate,
top_k / sort (on the mapped axis), and `transpose` itself, which only changes `perm` and
emits nothing. A reshape that only merges or splits axes that are adjacent and in order
in the stored tensor is done on it as stored (the NCHW map (N, H, W, C) -> (N, H*W, C)
of k-max pooling is the stored (N, C, H*W), and TopK runs on its last axis); any other
reshape, and broadcast_in_dim, first Transpose back to the logical order (the result is
plain). A dot_general becomes one (batched) MatMul, each operand transposed to (batch,
free, contract) order only where it is not stored so (an NCHW attention map already is
(N, M, H*W) for 'nhwm,nhwc->nmc'). Graph outputs are returned in the logical order. The
backbones' fast path is unchanged: BN-folded conv, bias, ReLU / ReLU6 and global average
pool become Conv-with-bias, Relu / Clip and GlobalAveragePool that onnxruntime fuses
(`onnx_fusion.fuse`), one Transpose at the input and none after it.

Anything else raises `UnsupportedPrimitive` (a NotImplementedError naming the
primitive); fgjax.export.make_cpu_predictor turns that into an `OnnxExportError` at
build time. Only the equations the requested outputs depend on are translated, so an
unsupported op feeding an output nobody asked for does not block the export.
"""

import math
from typing import Any, Collection, Optional, Sequence

from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

# Physical (ONNX, NCHW) axis i of a 4-D NHWC value holds logical axis NCHW[i].
NCHW = (0, 3, 1, 2)

_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "abs": "Abs",
          "tanh": "Tanh", "logistic": "Sigmoid", "sign": "Sign", "floor": "Floor",
          "ceil": "Ceil", "erf": "Erf", "sin": "Sin", "cos": "Cos"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
           "min": "Min", "pow": "Pow", "gt": "Greater", "lt": "Less",
           "ge": "GreaterOrEqual", "le": "LessOrEqual", "eq": "Equal"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd"}
_PASS_THROUGH = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint")


class UnsupportedPrimitive(NotImplementedError):
  """The ONNX translation has no rule for `primitive` (or for this use of it)."""

  def __init__(self, primitive: str, detail: str = ""):
    self.primitive = primitive
    self.detail = detail
    super().__init__(f"ONNX export: primitive '{primitive}' is not supported"
                     + (f" ({detail})" if detail else "") + ".")


class Val:
  """A translated value: ONNX tensor `name` holding logical `shape` permuted by `perm`."""
  __slots__ = ("name", "perm", "shape", "dtype")

  def __init__(self, name: str, perm: Sequence[int], shape: Sequence[int], dtype: Any):
    self.name, self.perm = name, tuple(perm)
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)


def _identity(rank: int) -> tuple[int, ...]:
  return tuple(range(rank))


def onnx_type(dtype: Any) -> int:
  from onnx import helper  # pylint: disable=g-import-not-at-top
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class Translator:
  """jaxpr -> list of onnx NodeProtos + constants (see the module docstring)."""

  def __init__(self):
    from onnx import helper  # pylint: disable=g-import-not-at-top
    self.helper = helper
    self.nodes: list[Any] = []
    self.consts: dict[str, np.ndarray] = {}
    self.spatial_sums: dict[str, int] = {}  # ReduceSum over NCHW H, W -> H * W
    self.matmul_2d: set[str] = set()  # MatMul (N, K) x const (K, M): Gemm candidates
    self.env: dict[Any, Any] = {}  # jaxpr var -> Val, or np.ndarray for constants
    self._perm_cache: dict[tuple[str, tuple[int, ...]], str] = {}  # -> Transpose
    self._count = 0

  # --- graph building ------------------------------------------------------------
  def fresh(self, prefix: str = "_t") -> str:
    self._count += 1
    return f"{prefix}{self._count}"

  def const(self, value: Any, dtype: Any = None) -> str:
    name = self.fresh("_c")
    self.consts[name] = np.asarray(value, dtype)
    return name

  def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs):
    outs = [self.fresh() for _ in range(n_out)]
    self.nodes.append(self.helper.make_node(op, list(inputs), outs, **attrs))
    return outs[0] if n_out == 1 else outs

  def as_perm(self, v: Val, perm: Sequence[int]) -> str:
    """The name of `v` stored with physical axis i holding logical axis perm[i]."""
    perm = tuple(perm)
    if v.perm == perm:
      return v.name
    # Keyed by the stored tensor and the physical permutation: a `transpose` result
    # shares its operand's tensor under another logical order.
    key = (v.name, tuple(v.perm.index(a) for a in perm))
    if key not in self._perm_cache:
      self._perm_cache[key] = self.node("Transpose", [v.name], perm=list(key[1]))
    return self._perm_cache[key]

  def plain(self, v: Val) -> str:
    return self.as_perm(v, _identity(len(v.shape)))

  def physical(self, v: Val) -> list[int]:
    return [v.shape[a] for a in v.perm]

  # --- jaxpr walking -------------------------------------------------------------
  def read(self, atom: Any) -> Any:
    if isinstance(atom, jax_core.Literal):
      return np.asarray(atom.val, atom.aval.dtype)
    return self.env[atom]

  def run(self, jaxpr: Any, args: Sequence[Any], needed: Sequence[bool]) -> list[Any]:
    """Translates the equations of `jaxpr` that the `needed` outputs depend on."""
    for var, val in zip(jaxpr.invars, args):
      self.env[var] = val
    live = {v for v, n in zip(jaxpr.outvars, needed)
            if n and not isinstance(v, jax_core.Literal)}
    todo = []
    for eqn in reversed(jaxpr.eqns):
      if any(v in live for v in eqn.outvars) or eqn.effects:
        todo.append(eqn)
        live.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
    for eqn in reversed(todo):
      outs = self.eqn(eqn, [v in live for v in eqn.outvars])
      for var, val in zip(eqn.outvars, outs):
        self.env[var] = val
    return [self.read(v) if n else None for v, n in zip(jaxpr.outvars, needed)]

  def eqn(self, eqn: Any, needed: Sequence[bool]) -> list[Any]:
    prim, p = eqn.primitive.name, eqn.params
    args = [self.read(a) for a in eqn.invars]
    if prim in _CALLS:
      sub = p.get("jaxpr", p.get("call_jaxpr"))
      closed_consts = getattr(sub, "consts", [])
      sub = getattr(sub, "jaxpr", sub)
      if sub is None:
        raise UnsupportedPrimitive(prim, "no inner jaxpr")
      for cv, c in zip(sub.constvars, closed_consts):
        self.env[cv] = np.asarray(c)
      return self.run(sub, args, needed)
    if all(isinstance(a, np.ndarray) for a in args):
      # Constant folding on the host (logical layout), e.g. bias broadcasts.
      out = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **p)
      outs = out if eqn.primitive.multiple_results else [out]
      return [np.asarray(o) for o in outs]
    out_avals = [v.aval for v in eqn.outvars]
    result = self.translate(prim, p, args, [v.aval for v in eqn.invars], out_avals)
    return result if isinstance(result, list) else [result]

  # --- primitives ----------------------------------------------------------------
  def translate(self, prim: str, p: dict, args: list, in_avals: list,
                out_avals: list) -> Any:
    out = out_avals[0]
    if prim in _PASS_THROUGH:
      return args[0] if len(args) == 1 else list(args)
    if prim == "convert_element_type":
      v = args[0]
      if np.dtype(p["new_dtype"]) == v.dtype:
        return v
      return Val(self.node("Cast", [v.name], to=onnx_type(p["new_dtype"])), v.perm,
                 v.shape, p["new_dtype"])
    if prim in _BINARY:
      return self.elementwise(_BINARY[prim], args, out)
    if prim == "ne":
      eq = self.elementwise("Equal", args, out)
      return Val(self.node("Not", [eq.name]), eq.perm, eq.shape, eq.dtype)
    if prim in ("and", "or", "not") and all(np.dtype(a.dtype) == np.bool_
                                            for a in in_avals):
      return self.elementwise(prim.capitalize(), args, out)
    if prim == "rem" and np.issubdtype(out.dtype, np.floating):
      return self.elementwise("Mod", args, out, fmod=1)
    if prim in _UNARY:
      return self.elementwise(_UNARY[prim], args, out)
    if prim == "rsqrt":
      s = self.elementwise("Sqrt", args, out)
      return Val(self.node("Reciprocal", [s.name]), s.perm, s.shape, s.dtype)
    if prim == "square":
      return self.elementwise("Mul", [args[0], args[0]], out)
    if prim == "integer_pow":
      if p["y"] == 1:
        return args[0]
      if p["y"] == 2:
        return self.elementwise("Mul", [args[0], args[0]], out)
      return self.elementwise("Pow", [args[0], np.asarray(p["y"], out.dtype)], out)
    if prim == "select_n":
      if len(args) != 3:
        raise UnsupportedPrimitive(prim, f"{len(args) - 1} cases; only 2 (jnp.where)")
      pred, on_false, on_true = args
      return self.elementwise("Where", [pred, on_true, on_false], out)
    if prim == "clamp":
      lo, x, hi = args
      if all(isinstance(c, np.ndarray) and c.ndim == 0 for c in (lo, hi)):
        x = x if isinstance(x, Val) else self.const_val(x)
        return Val(self.node("Clip", [x.name, self.const(lo, out.dtype),
                                      self.const(hi, out.dtype)]), x.perm, x.shape,
                    out.dtype)
      return self.elementwise("Max", [self.elementwise("Min", [x, hi], out), lo], out)
    if prim in _REDUCE or prim in ("argmax", "argmin"):
      return self.reduce(prim, p, args[0], out)
    if prim == "squeeze":
      return self.squeeze(args[0], p["dimensions"], out)
    if prim == "reshape":
      if p.get("dimensions") is not None:
        raise UnsupportedPrimitive(prim, "reshape with dimensions")
      return self.reshape(self.value(args[0]), out)
    if prim == "broadcast_in_dim":
      return self.broadcast(args[0], p["broadcast_dimensions"], out)
    if prim == "transpose":
      v, q = self.value(args[0]), tuple(p["permutation"])
      return Val(v.name, [q.index(a) for a in v.perm], out.shape, out.dtype)
    if prim == "concatenate":
      vals = [a for a in args if isinstance(a, Val)]
      perm = max(vals, key=lambda v: math.prod(v.shape)).perm
      names = [self.as_perm(a, perm) if isinstance(a, Val)
               else self.const(np.transpose(a, perm)) for a in args]
      return Val(self.node("Concat", names, axis=perm.index(p["dimension"])), perm,
                 out.shape, out.dtype)
    if prim == "stack":  # jnp.stack: each operand gains the new axis, then Concat.
      axis = p["axis"] % len(out.shape)
      ident = list(range(len(out.shape) - 1))
      names = [self.node("Unsqueeze", [self.as_perm(self.value(a), ident),
                                       self.const([axis], np.int64)]) for a in args]
      return Val(self.node("Concat", names, axis=axis), list(range(len(out.shape))),
                 out.shape, out.dtype)
    if prim == "slice":
      v = self.value(args[0])
      strides = p["strides"] or (1,) * len(v.shape)
      axes = list(range(len(v.shape)))
      phys = lambda seq: [int(seq[a]) for a in v.perm]  # noqa: E731
      name = self.node("Slice", [v.name, self.const(phys(p["start_indices"]), np.int64),
                                 self.const(phys(p["limit_indices"]), np.int64),
                                 self.const(axes, np.int64),
                                 self.const(phys(strides), np.int64)])
      return Val(name, v.perm, out.shape, out.dtype)
    if prim == "pad":
      v, value = self.value(args[0]), args[1]
      config = p["padding_config"]
      if any(int(i) != 0 or int(lo) < 0 or int(hi) < 0 for lo, hi, i in config):
        raise UnsupportedPrimitive(prim, "interior or negative padding")
      pads = [int(config[a][0]) for a in v.perm] + [int(config[a][1]) for a in v.perm]
      value = value.name if isinstance(value, Val) else self.const(value, out.dtype)
      name = self.node("Pad", [v.name, self.const(pads, np.int64), value])
      return Val(name, v.perm, out.shape, out.dtype)
    if prim == "top_k":
      v = self.value(args[0])
      axis = p.get("axis", -1) % len(v.shape)
      values, indices = self.node("TopK", [v.name, self.const([p["k"]], np.int64)],
                                  n_out=2, axis=v.perm.index(axis), largest=1,
                                  sorted=1)
      idx = self.node("Cast", [indices], to=onnx_type(out_avals[1].dtype))
      return [Val(values, v.perm, out.shape, out.dtype),
              Val(idx, v.perm, out_avals[1].shape, out_avals[1].dtype)]
    if prim == "sort":
      if len(args) != 1:
        raise UnsupportedPrimitive(prim, f"sort of {len(args)} operands (argsort)")
      v = self.value(args[0])
      dim = p["dimension"] % len(v.shape)
      values, _ = self.node("TopK", [v.name, self.const([v.shape[dim]], np.int64)],
                            n_out=2, axis=v.perm.index(dim), largest=0, sorted=1)
      return Val(values, v.perm, out.shape, out.dtype)
    if prim == "dot_general":
      return self.dot_general(args, p["dimension_numbers"], in_avals, out)
    if prim == "conv_general_dilated":
      return self.conv(args, p, out)
    if prim == "reduce_window_max":
      return self.max_pool(args[0], p, out)
    raise UnsupportedPrimitive(prim)

  def value(self, a: Any) -> Val:
    return a if isinstance(a, Val) else self.const_val(a)

  def const_val(self, c: np.ndarray) -> Val:
    return Val(self.const(c), _identity(c.ndim), c.shape, c.dtype)

  def elementwise(self, op: str, args: Sequence[Any], out: Any, **attrs) -> Val:
    """An n-ary elementwise op in the layout of its largest non-constant operand."""
    rank = len(out.shape)
    vals = [a for a in args if isinstance(a, Val) and len(a.shape) == rank]
    perm = (max(vals, key=lambda v: math.prod(v.shape)).perm if vals
            else _identity(rank))
    names = []
    for a in args:
      if isinstance(a, Val):
        names.append(self.as_perm(a, perm) if len(a.shape) == rank else a.name)
      else:
        a = np.asarray(a)
        names.append(self.const(np.transpose(a, perm) if a.ndim == rank else a))
    return Val(self.node(op, names, **attrs), perm, out.shape, out.dtype)

  def _remaining(self, v: Val, axes: Collection[int]) -> tuple[list[int], list[int]]:
    """(physical axes of `axes`, perm of what remains after removing them)."""
    phys = sorted(v.perm.index(a) for a in axes)
    left = [a for a in v.perm if a not in axes]
    rank = {a: i for i, a in enumerate(sorted(left))}
    return phys, [rank[a] for a in left]

  def reduce(self, prim: str, p: dict, v: Val, out: Any) -> Val:
    axes = tuple(int(a) for a in p["axes"])
    if not axes:
      return v
    phys, perm = self._remaining(v, axes)
    if prim in ("argmax", "argmin"):
      idx = self.node("ArgMax" if prim == "argmax" else "ArgMin", [v.name],
                      axis=phys[0], keepdims=0)
      return Val(self.node("Cast", [idx], to=onnx_type(out.dtype)), perm, out.shape,
                 out.dtype)
    if prim == "reduce_sum":
      name = self.node("ReduceSum", [v.name, self.const(phys, np.int64)], keepdims=0)
      if len(v.shape) == 4 and v.perm == NCHW and phys == [2, 3]:
        self.spatial_sums[name] = v.shape[1] * v.shape[2]
    else:
      name = self.node(_REDUCE[prim], [v.name], axes=phys, keepdims=0)
    return Val(name, perm, out.shape, out.dtype)

  def squeeze(self, v: Val, dims: Sequence[int], out: Any) -> Val:
    phys, perm = self._remaining(v, [d % len(v.shape) for d in dims])
    name = self.node("Squeeze", [v.name, self.const(phys, np.int64)])
    return Val(name, perm, out.shape, out.dtype)

  def reshape(self, v: Val, out: Any) -> Val:
    """Reshape in v's own layout when it only merges / splits axes that are adjacent
    and in order there (e.g. an NCHW map (N, H, W, C) -> (N, H*W, C) is the physical
    (N, C, H*W)); otherwise Transpose to the logical order first."""
    perm = _reshape_perm(v.shape, out.shape, v.perm)
    if perm is None:
      name, perm, stored = self.plain(v), _identity(len(out.shape)), list(v.shape)
    else:
      name, stored = v.name, self.physical(v)
    phys = [out.shape[a] for a in perm]
    if stored != phys:
      name = self.node("Reshape", [name, self.const(phys, np.int64)])
    return Val(name, perm, out.shape, out.dtype)

  def broadcast(self, v: Val, dims: Sequence[int], out: Any) -> Val:
    """broadcast_in_dim of a value: Reshape (insert size-1 axes), Expand if needed."""
    mid = [1] * len(out.shape)
    for i, d in enumerate(dims):
      mid[d] = v.shape[i]
    name = self.plain(v)
    if list(v.shape) != mid:
      name = self.node("Reshape", [name, self.const(mid, np.int64)])
    if mid != list(out.shape):
      name = self.node("Expand", [name, self.const(out.shape, np.int64)])
    return Val(name, _identity(len(out.shape)), out.shape, out.dtype)

  def arranged(self, a: Any, order: Sequence[int], shape: Sequence[int]) -> str:
    """`a` with its logical axes in `order`, reshaped to `shape`."""
    if isinstance(a, np.ndarray):
      return self.const(np.transpose(a, order).reshape(shape))
    name = self.as_perm(a, order)
    if [a.shape[d] for d in order] != list(shape):
      name = self.node("Reshape", [name, self.const(shape, np.int64)])
    return name

  def dot_general(self, args: list, dims: Any, in_avals: list, out: Any) -> Val:
    """dot_general as one (batched) MatMul: (B.., M, K) x (B.., K, N) -> (B.., M, N)."""
    (lc, rc), (lb, rb) = dims
    lhs, rhs = args
    ls, rs = in_avals[0].shape, in_avals[1].shape
    lfree = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rs)) if d not in rc and d not in rb]
    batch = [ls[d] for d in lb]
    m = math.prod(ls[d] for d in lfree)
    k = math.prod(ls[d] for d in lc)
    n = math.prod(rs[d] for d in rfree)
    a = self.arranged(lhs, list(lb) + lfree + list(lc), batch + [m, k])
    b = self.arranged(rhs, list(rb) + list(rc) + rfree, batch + [k, n])
    name = self.node("MatMul", [a, b])
    if not batch and isinstance(rhs, np.ndarray) and list(out.shape) == [m, n]:
      self.matmul_2d.add(name)
    if list(out.shape) != batch + [m, n]:
      name = self.node("Reshape", [name, self.const(out.shape, np.int64)])
    return Val(name, _identity(len(out.shape)), out.shape, out.dtype)

  def conv(self, args: list, p: dict, out: Any) -> Val:
    dn = p["dimension_numbers"]
    if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != (
        (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
      raise UnsupportedPrimitive("conv_general_dilated", f"layout {dn}")
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
      raise UnsupportedPrimitive("conv_general_dilated",
                                 "transposed (lhs-dilated) or batch-grouped conv")
    if not isinstance(args[1], np.ndarray):
      raise UnsupportedPrimitive("conv_general_dilated", "non-constant kernel")
    x = self.as_perm(self.value(args[0]), NCHW)
    kernel = np.transpose(args[1], (3, 2, 0, 1))  # HWIO -> OIHW
    (t, b), (l, r) = p["padding"]
    name = self.node("Conv", [x, self.const(kernel)],
                     group=int(p["feature_group_count"]),
                     strides=list(p["window_strides"]), pads=[t, l, b, r],
                     dilations=list(p["rhs_dilation"]),
                     kernel_shape=list(kernel.shape[2:]))
    return Val(name, NCHW, out.shape, out.dtype)

  def max_pool(self, v: Any, p: dict, out: Any) -> Val:
    win, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if (len(win) != 4 or win[0] != 1 or win[3] != 1 or strides[0] != 1 or
        strides[3] != 1 or any(d != 1 for d in p["base_dilation"]) or
        any(d != 1 for d in p["window_dilation"])):
      raise UnsupportedPrimitive("reduce_window_max",
                                 "only NHWC spatial windows without dilation")
    x = self.as_perm(self.value(v), NCHW)
    name = self.node("MaxPool", [x], kernel_shape=list(win[1:3]),
                     strides=list(strides[1:3]),
                     pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]])
    return Val(name, NCHW, out.shape, out.dtype)


def _reshape_perm(src: Sequence[int], dst: Sequence[int],
                  perm: Sequence[int]) -> Optional[list[int]]:
  """The layout of reshape(src -> dst) done on a tensor stored as `perm`, or None.

  src and dst axes split into consecutive groups of equal size product (a group maps
  input axes to output axes, either side possibly empty for size-1 axes). Reshaping
  the stored tensor is the logical reshape iff every group's input axes are adjacent
  and in increasing order in `perm`; the output then stores the groups in the order
  their inputs are stored, each group's output axes in order.
  """
  groups, i, j = [], 0, 0
  while i < len(src) or j < len(dst):
    gi, gj, pi, pj = [], [], 1, 1
    if i < len(src):
      gi.append(i)
      pi, i = pi * src[i], i + 1
    if j < len(dst):
      gj.append(j)
      pj, j = pj * dst[j], j + 1
    while pi != pj:
      if pi < pj:
        gi.append(i)
        pi, i = pi * src[i], i + 1
      else:
        gj.append(j)
        pj, j = pj * dst[j], j + 1
    groups.append((gi, gj))
  pos = {a: k for k, a in enumerate(perm)}
  keyed = []
  last = -1.0
  for gi, gj in groups:
    if gi:
      where = [pos[a] for a in gi]
      if where != list(range(where[0], where[0] + len(where))):
        return None
      last = float(where[0])
    else:
      last += 0.5 / (len(groups) + 1)  # size-1 output axes: right after the previous
    keyed.append((last, gj))
  return [a for _, gj in sorted(keyed, key=lambda t: t[0]) for a in gj]
