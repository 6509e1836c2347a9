"""Divergence guard: a run whose loss, gradients or embeddings blew up stops loudly.

A diverged impostor run can look healthy: with a huge learning rate the embeddings
grow without bound, every RBF kernel value underflows to the one nearest impostor, the
NCA loss reads 0.0 and the run "finishes" at chance accuracy. The training loop calls
`check` on the logged metrics of the step it is about to checkpoint (and of every
logged step), so the bad state is never saved over the last good checkpoint, and the
error names the step, the values and what to change.

The metrics come from fgjax.update: 'loss', 'grad_norm' (global L2 norm of the
gradient) and 'embedding_norm' (the largest L2 norm of a valid row of the network's
'embedding' output in the batch).
"""

import math
from typing import Any, Mapping, Optional


class TrainingDiverged(RuntimeError):
  """Training produced non-finite or exploding values; nothing after it was saved."""


def check(metrics: Mapping[str, Any], step: int, *, max_embedding_norm: float,
          last_good_step: Optional[int], checkpoint_dir: str,
          learning_rate: float) -> None:
  """Raises TrainingDiverged if `metrics` (host scalars of `step`) show divergence.

  Args:
    metrics: the step's metrics; 'loss' and 'grad_norm' must be finite,
      'embedding_norm' (when present) finite and at most `max_embedding_norm`
      (0 disables the norm limit, never the finiteness checks).
    step: the step the metrics belong to.
    max_embedding_norm: config.train.max_embedding_norm.
    last_good_step: the latest saved checkpoint's step (None: none saved yet).
    checkpoint_dir: where that checkpoint lies, for the message.
    learning_rate: config.optim.learning_rate, for the message.
  """
  problems = []
  for key, what in (("loss", "loss"), ("grad_norm", "gradient norm"),
                    ("embedding_norm", "embedding norm")):
    if key in metrics and not math.isfinite(float(metrics[key])):
      problems.append(f"{what} is {float(metrics[key])}")
  norm = metrics.get("embedding_norm")
  if (norm is not None and max_embedding_norm and math.isfinite(float(norm)) and
      float(norm) > max_embedding_norm):
    problems.append(f"largest embedding norm {float(norm):.3g} exceeds "
                    f"train.max_embedding_norm={max_embedding_norm:g}")
  if not problems:
    return
  kept = (f"the last good checkpoint (step {last_good_step}) is kept in {checkpoint_dir}"
          if last_good_step is not None else "no checkpoint had been saved yet")
  raise TrainingDiverged(
      f"training diverged at step {step}: {'; '.join(problems)}. Nothing from this "
      f"step on was saved; {kept}. Lower optim.learning_rate (now {learning_rate:g}) "
      "and start in a fresh workdir, or raise train.max_embedding_norm (0 turns the "
      "norm limit off) if such norms are expected; the workdir resumes with that "
      "change.")
