"""Scheme presets: network, loss terms and impostor policy, and explicit overrides."""

import pytest

from configs import common
from fgjax import schemes


@pytest.mark.parametrize("scheme,net,terms,policy", [
    ("ce", "convnet", ("ce",), "none"),
    ("ce_extra", "convnet_extra", ("ce",), "none"),
    ("tied", "impostor", ("nca",), "tied"),
    ("fixed", "impostor", ("nca",), "fixed"),
    ("loose", "impostor", ("nca", "attachment"), "loose"),
])
def test_presets(scheme, net, terms, policy):
  c = common.get_config()
  c.scheme = scheme
  assert schemes.resolve(c) == schemes.Resolved(scheme, net, terms, policy)


def test_explicit_fields_win_and_extra_terms_add():
  c = common.get_config()
  c.scheme = "loose"
  c.impostors.pq_bytes = 8
  assert schemes.resolve(c).policy == "loose"  # only 'fixed' trains compressed
  c.scheme = "fixed"
  assert schemes.resolve(c).policy == "compressed_fixed"
  c.model.net, c.loss.terms, c.impostors.policy = "convnet_extra", "ce, nca", "loose"
  c.loss.extra_terms = "elope,nca"
  r = schemes.resolve(c)
  assert (r.net, r.terms, r.policy) == ("convnet_extra", ("ce", "nca", "elope"), "loose")
  assert r.describe()["terms"] == ("ce", "nca", "elope")
  c.scheme = "bogus"
  with pytest.raises(ValueError, match="config.scheme='bogus'"):
    schemes.resolve(c)
