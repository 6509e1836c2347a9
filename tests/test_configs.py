"""Every config in configs/ validates and builds: its network, loss terms and impostor
policy fit together (what train.Run checks before touching data), and its docstring
holds its own run command."""

import importlib
import pathlib

import jax
import pytest

from fgjax import config_checks
from fgjax import impostor_policies
from fgjax import objectives
from fgjax import schemes
from fgjax.models import nets

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob(
    "*.py") if p.stem not in ("__init__", "common"))


def test_the_config_list_is_complete():
  assert {"digits_loose", "birds525_loose", "cars196_elope", "cub_elope"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_builds_and_documents_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  assert f"--config=configs/{name}.py" in module.__doc__
  config = module.get_config()
  config_checks.validate(config)
  resolved = schemes.resolve(config)
  network = nets.build(config.model, 7, net=resolved.net, pretrained=False)
  objective = objectives.build(resolved.terms, config.loss)
  policy = impostor_policies.make(resolved.policy, config)
  size = config.input.image_size
  abstract = jax.eval_shape(lambda: network.init(config.seed, size))
  shapes = network.output_shapes(size)
  config_checks.check_compatible(resolved, network, objective, policy, shapes,
                                 abstract["params"],
                                 schemes.split_names(config.model.frozen))
  if network.has_logits:
    assert shapes["logits"].shape == (1, 7)
  if policy.uses_impostors:
    assert shapes["embedding"].shape == (1, config.model.embed_dim)
