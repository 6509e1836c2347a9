"""Keeps freed host memory in the process, so XLA:CPU's per-step buffers stop page-faulting.

glibc serves every allocation above 32 MiB (the ceiling of its mmap threshold) with a
fresh mmap and gives it back to the kernel on free; a worker thread's arena does the same
for blocks above its 64 MiB heap. XLA:CPU allocates each execution's large temporaries
like that, so every training step maps its working set anew and takes a page fault per
4 KiB page on first touch. Measured on the 2-core VM (BENCHMARKS.md section 3):
SqueezeNet 1.1 train step at batch 32, 157k faults and about 0.1 s of a 0.6 s step.
PyTorch's CPU allocator meets the same glibc behaviour (98k faults per step); its usual
cure is jemalloc or tcmalloc through LD_PRELOAD. `retain_freed_memory` is the glibc-only
equivalent from inside the process: no preload, no environment variable.

What it sets (mallopt(3)):
  M_MMAP_MAX = 0               no mmap-backed blocks: large blocks come from the heap;
  M_TRIM_THRESHOLD = -1        never give the heap top back (EfficientNet-Lite0's step
                               touches 2.8 GB, so any int-sized threshold still trims);
  M_ARENA_MAX = 1              one arena, so worker threads' large blocks use the main
                               heap too (a thread arena cannot grow past 64 MiB and falls
                               back to mmap).
Costs: it is process-wide; freed memory stays mapped (resident size keeps its peak);
threads share one allocator lock (XLA allocates few, large blocks). It must run before
other threads allocate, i.e. before jax creates its CPU client: launch.py calls it first.

Where the environment can be set instead, GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc
>= 2.35, transparent huge pages in 'madvise' mode) gives a similar gain by faulting 2 MiB
pages.
"""

import ctypes
import ctypes.util
import os

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def is_glibc() -> bool:
  """Whether this process runs on glibc (instant, unlike platform.libc_ver)."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):
    return False


def retain_freed_memory() -> bool:
  """Tunes glibc malloc to reuse freed large blocks (see module docstring).

  Returns True when applied, False where the C library is not glibc (then nothing
  changes).
  """
  if not is_glibc():
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))
  # mallopt returns 1 on success; a 0 means this glibc rejected the value.
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
