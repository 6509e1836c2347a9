"""fgjax.host_memory: freed large blocks are reused instead of re-faulted."""

import subprocess
import sys

import pytest

from fgjax import host_memory

# Allocates, touches and frees a 64 MiB block five times; prints the minor page faults
# of the last four rounds (the first one maps the memory either way).
# Plain malloc through ctypes, as XLA's allocator does (numpy would madvise huge pages).
_PROBE = """
import ctypes, resource, sys
from fgjax import host_memory
if sys.argv[1] == "retain":
  assert host_memory.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2 ** 20
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                       text=True, check=True, timeout=120)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not host_memory.is_glibc(),
                    reason="mallopt tuning exists for glibc only")
def test_retain_freed_memory_stops_refaulting_large_blocks():
  pages = 4 * 64 * 2 ** 20 // 4096  # four rounds of a 64 MiB block, 4 KiB pages
  assert _faults("default") > pages // 2  # glibc unmaps and re-maps the block each time
  assert _faults("retain") < pages // 20
