"""Graph rewrites of the ONNX export: dead-node pruning and the fusions onnxruntime needs.

The translator (fgjax.export.onnx_translate) writes the jaxpr literally; these passes
turn it into the node patterns onnxruntime's CPU kernels fuse (Conv with bias + Relu /
Clip, Gemm, GlobalAveragePool), each an exact rewrite applied only where no other node
sees the value it changes.
"""

from typing import Any, Collection, Optional, Sequence

import numpy as np


def prune(nodes: list[Any], outputs: Sequence[str]) -> list[Any]:
  """Drops nodes none of whose outputs reach a graph output."""
  live, kept = set(outputs), []
  for n in reversed(nodes):
    if any(o in live for o in n.output):
      kept.append(n)
      live.update(n.input)
  return kept[::-1]


def _scalar(consts: dict[str, np.ndarray], name: str) -> Optional[float]:
  """The value of a constant that is one number (any shape of size 1), else None."""
  v = consts.get(name)
  return float(v.reshape(())) if v is not None and v.size == 1 else None


def fuse(nodes: list[Any], consts: dict[str, np.ndarray], spatial_sums: dict[str, int],
          outputs: list[str], matmul_2d: Collection[str] = ()) -> list[Any]:
  """Rewrites the literal jaxpr translation into the ops onnxruntime fuses.

  The jaxpr of a BN-folded conv + ReLU6 is conv, add(bias), max(0), min(6); onnxruntime
  only fuses an activation into Conv (and into its NCHWc kernels) when the bias is Conv's
  third input and the activation is a Relu / Clip node. Rewrites, each only when the
  intermediate value has a single consumer (so no other node sees a changed value):
    Conv(x, W) -> Add(per-channel const)      => Conv(x, W, B)
    Max(x, 0)                                 => Relu(x)
    Relu(x) -> Min(x, c)                      => Clip(x, 0, c)
    MatMul(x, W) -> Add(const row)            => Gemm(x, W, b)  (x 2-D: `matmul_2d`)
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
      w = consts.get(prev.input[1]) if prev.op_type == "MatMul" else None
      if w is not None and prev.output[0] in matmul_2d and c is not None and \
          w.ndim == 2 and c.shape in ((w.shape[1],), (1, w.shape[1])):
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
