"""benchmarks/gpu.py's NCA part: forward + backward of fgjax.losses.nca_loss at M =
100,000 impostors (jitted, unchunked and chunked) and its peak memory, against the same
math in PyTorch eager (matmul distances, log-sum-exp) on the same GPU."""

import dataclasses
import math
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import gpu_devices


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The part's flags: impostors M, width d, queries B, classes, kernel width, timed
  calls, and whether to compare with PyTorch."""
  m: int
  dim: int
  batch: int
  num_classes: int
  sigma: float
  reps: int
  torch: bool


def _nca_data(sizes: Sizes):
  rng = np.random.default_rng(0)
  b, d, k, m = sizes.batch, sizes.dim, sizes.num_classes, sizes.m
  q = rng.standard_normal((b, d), dtype=np.float32) / np.sqrt(d)
  c = rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
  return q, rng.integers(0, k, b).astype(np.int32), c, np.arange(m, dtype=np.int32) % k


def _time_calls(fn, reps: int, sync) -> tuple[float, float]:
  """(best, median) seconds of fn() after two warm-up calls; sync() waits for it."""
  for _ in range(2):
    sync(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return min(times), statistics.median(times)


def fgjax_nca(chunk: int, sizes: Sizes) -> dict[str, Any]:
  """Jitted mean nca_loss and its gradients w.r.t. queries and impostors."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fgjax import losses  # pylint: disable=g-import-not-at-top
  q, ql, c, cl = (jnp.asarray(a) for a in _nca_data(sizes))
  sigma = sizes.sigma

  def loss(q, ql, c, cl):  # labels are arguments: XLA would fold (M,) constants
    return losses.nca_loss(q, ql, c, cl, sigma, chunk_size=chunk or None).mean()

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
  t0 = time.perf_counter()
  compiled = fn.lower(q, ql, c, cl).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  best, median = _time_calls(lambda: compiled(q, ql, c, cl), sizes.reps,
                             jax.block_until_ready)
  value, (dq, dc) = compiled(q, ql, c, cl)
  if not (math.isfinite(float(value)) and bool(jnp.isfinite(dc).all())):
    raise FloatingPointError(f"non-finite NCA loss or gradient (loss {float(value)})")
  return {"framework": "fgjax", "M": sizes.m, "B": sizes.batch, "d": sizes.dim,
          "chunk_size": chunk or None, "compile_s": round(compile_s, 3),
          "ms_per_call": round(1e3 * median, 3), "best_ms": round(1e3 * best, 3),
          "loss": float(value),
          "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
          "peak_device_bytes": gpu_devices.peak_device_bytes()}


def torch_nca(sizes: Sizes) -> dict[str, Any]:
  """The same loss in PyTorch eager: squared distances by one matmul, log-sum-exp over
  all impostors minus over the query's class; autograd for the backward pass."""
  torch = gpu_devices.torch_cuda(sizes.torch)
  dev = torch.device("cuda")
  q_np, ql_np, c_np, cl_np = _nca_data(sizes)
  q = torch.tensor(q_np, device=dev, requires_grad=True)
  c = torch.tensor(c_np, device=dev, requires_grad=True)
  ql = torch.tensor(ql_np, device=dev, dtype=torch.long)
  cl = torch.tensor(cl_np, device=dev, dtype=torch.long)
  scale = 1.0 / (2.0 * sizes.sigma**2)
  same = ql[:, None] == cl[None, :]

  def call():
    q.grad = c.grad = None
    d = ((q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * q @ c.T).clamp_min(0)
    a = -scale * d
    loss = (torch.logsumexp(a, 1)
            - torch.logsumexp(a.masked_fill(~same, -math.inf), 1)).mean()
    loss.backward()
    return loss

  torch.cuda.reset_peak_memory_stats()
  best, median = _time_calls(call, sizes.reps, lambda _: torch.cuda.synchronize())
  return {"framework": "torch eager", "torch": torch.__version__, "M": sizes.m,
          "B": sizes.batch, "d": sizes.dim,
          "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
          "ms_per_call": round(1e3 * median, 3), "best_ms": round(1e3 * best, 3),
          "loss": float(call()),
          "peak_device_bytes": int(torch.cuda.max_memory_allocated())}
