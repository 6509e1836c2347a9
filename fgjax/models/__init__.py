"""fgjax models: backbones with named outputs, poolings and networks, each by name.

  spec = fgjax.models.get('efficientnet_lite0', pretrained=True)   # a backbone
  net = fgjax.models.nets.build(config.model, num_classes)         # a whole network

Backbones (`registry`) return {'stem', 'stage1'..'stageK', 'map', 'pooled'}; networks
(`nets`) put a pooling (`pooling`) and heads on a backbone and return a documented
outputs dict.
"""

# Networks register by importing their modules.
from fgjax.models import bap  # noqa: F401  pylint: disable=unused-import
from fgjax.models import coarse2fine  # noqa: F401  pylint: disable=unused-import
from fgjax.models import localized  # noqa: F401  pylint: disable=unused-import
from fgjax.models import nets  # noqa: F401  pylint: disable=unused-import
from fgjax.models.registry import get
from fgjax.models.registry import host_init
from fgjax.models.registry import ModelSpec
from fgjax.models.registry import names

__all__ = ["ModelSpec", "get", "host_init", "names"]
