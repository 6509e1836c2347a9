"""Registries: every "by name" choice of a config (network, pooling, loss term, impostor
policy, data source) is an entry registered under its name.

  POOLINGS = registries.Registry("pooling", "config.model.pooling")

  @POOLINGS.register("kmax")
  class KMaxPool(nn.Module): ...

  POOLINGS.get("kmax")     # the class; an unknown name is a ValueError naming the
                           # config field and every registered name

Plain Python (no JAX), so the bottom of every layer may use it.
"""

from typing import Any, Callable, Optional


class Registry:
  """Names -> entries (classes or functions) of one kind.

  Args:
    kind: what the entries are, for messages ('pooling', 'loss term').
    field: the config field that names them, for messages ('config.model.pooling').
    name_attr: if set, `register` stores the entry's name in this attribute of the
      entry (e.g. 'name' on a loss-term class, so instances know their config section).
  """

  def __init__(self, kind: str, field: str, name_attr: Optional[str] = None):
    self.kind, self.field, self.name_attr = kind, field, name_attr
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    """Decorator: registers the decorated class or function under `name`."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"a {self.kind} name must be a non-empty str, got {name!r}.")

    def wrap(entry):
      if name in self._entries and self._entries[name] is not entry:
        raise ValueError(f"{self.kind} {name!r} is already registered "
                         f"({getattr(self._entries[name], '__qualname__', '?')}).")
      if self.name_attr:
        setattr(entry, self.name_attr, name)
      self._entries[name] = entry
      return entry
    return wrap

  def unregister(self, name: str) -> None:
    """Removes `name` (tests register temporary entries)."""
    self._entries.pop(name, None)

  def names(self) -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(self._entries))

  def __contains__(self, name: Any) -> bool:
    return name in self._entries

  def get(self, name: Any) -> Any:
    """The entry registered as `name`; a ValueError naming the field otherwise."""
    if not isinstance(name, str) or name not in self._entries:
      raise ValueError(f"{self.field}={name!r} is not a registered {self.kind}; use one "
                       f"of {', '.join(self.names())}.")
    return self._entries[name]
