"""The five training schemes of the impostor paper as presets (section 4, "Compared
approaches"): a network, loss terms and an impostor policy. They share one update path
(fgjax.update) and one loop (fgjax.train); nothing else knows their names.

| scheme   | network (config.model.net) | loss terms (config.loss.terms) | impostor policy |
|----------|----------------------------|--------------------------------|-----------------|
| ce       | convnet                    | ce                             | none            |
| ce_extra | convnet_extra              | ce                             | none            |
| tied     | impostor                   | nca, eq. (4)                   | tied: reset to the current embeddings every N epochs (eq. 5, relaxed as in Movshovitz-Attias et al.) |
| fixed    | impostor                   | nca                            | fixed: frozen at the initial network's embeddings (compressed_fixed with config.impostors.pq_bytes, paper "Impostors compression") |
| loose    | impostor                   | nca, attachment, eq. (6)       | loose: optimised jointly |

A field set explicitly in the config wins over the preset: `config.model.net`,
`config.loss.terms` (comma-separated names) and `config.impostors.policy`.
`config.loss.extra_terms` adds terms to either, e.g. 'elope' for ELoPE's class-mean
loss on the embedding (L = L_scheme + lambda L_e, ELoPE eq. 1).
"""

import dataclasses
from typing import Any, Callable

NAMES = ("ce", "ce_extra", "tied", "fixed", "loose")


@dataclasses.dataclass(frozen=True)
class Preset:
  net: str
  terms: tuple[str, ...]
  policy: Callable[[Any], str]


_PRESETS = {
    "ce": Preset("convnet", ("ce",), lambda c: "none"),
    "ce_extra": Preset("convnet_extra", ("ce",), lambda c: "none"),
    "tied": Preset("impostor", ("nca",), lambda c: "tied"),
    "fixed": Preset("impostor", ("nca",),
                    lambda c: "compressed_fixed" if c.impostors.pq_bytes else "fixed"),
    "loose": Preset("impostor", ("nca", "attachment"), lambda c: "loose"),
}


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What a run trains: the scheme's preset with the config's explicit choices applied."""
  scheme: str
  net: str
  terms: tuple[str, ...]
  policy: str

  def describe(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def split_names(value: str) -> tuple[str, ...]:
  """'nca, attachment' -> ('nca', 'attachment'); '' -> ()."""
  return tuple(n.strip() for n in str(value).split(",") if n.strip())


def resolve(config) -> Resolved:
  """The network, loss terms and impostor policy of `config`."""
  if config.scheme not in _PRESETS:
    raise ValueError(f"config.scheme={config.scheme!r} is unknown; use one of "
                     f"{', '.join(NAMES)}.")
  preset = _PRESETS[config.scheme]
  terms = split_names(config.loss.terms) or preset.terms
  terms += tuple(t for t in split_names(config.loss.extra_terms) if t not in terms)
  return Resolved(scheme=config.scheme, net=config.model.net or preset.net, terms=terms,
                  policy=config.impostors.policy or preset.policy(config))
