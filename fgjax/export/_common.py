"""Output selection shared by the CPU engines (fgjax.export)."""

from typing import Any, Sequence


def output_names(outputs: Any) -> tuple[str, ...]:
  """A tuple of output names from a name or a sequence of names (checked)."""
  names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"outputs must name the outputs to return, e.g. ('embedding',) "
                     f"or ('pooled',); got {outputs!r}.")
  if len(set(names)) != len(names):
    raise ValueError(f"outputs {names} name an output twice.")
  return names


def select_outputs(out: Any, names: Sequence[str], who: str) -> tuple[Any, ...]:
  """(out[n] for n in names), with an error listing what `who` returns."""
  if not isinstance(out, dict):
    raise TypeError(f"{who} returns {type(out).__name__}, not a dict of named outputs.")
  missing = [n for n in names if n not in out]
  if missing:
    raise ValueError(f"{who} has no output(s) {', '.join(map(repr, missing))}; its "
                     f"outputs are {', '.join(out)}.")
  return tuple(out[n] for n in names)
