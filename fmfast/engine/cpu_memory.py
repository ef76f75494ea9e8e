"""glibc's malloc set to keep freed memory for reuse, for repeated CPU forwards.

``keep_freed_memory() -> (done, what it did in words)``. A compiled forward allocates the same
buffers on every call (inductor's intermediates, the custom ops' outputs: megabytes each at
B=16). glibc serves blocks above its mmap threshold (128 KB at first, then raised as such blocks
are freed) from fresh ``mmap``s and trims its heaps' free tops back to the system, so a buffer
freed by one call is zero-filled page by page again in the next: 180-3800 minor page faults per
forward in one process, varying from run to run with the allocation history (the paper-shape
FmFormer, bf16, B=16, 2 threads, on a Zen 4). With the mmap threshold at glibc's largest (32 MB
on 64-bit systems) and trimming off, they were 0-80, and the forward 133.1 -> 124.4 ms (medians
of five processes each, alternated).

The cost is memory: the process keeps its peak heap instead of handing it back, which a
process that runs one model call after another reaches on every call anyway. It is process-wide,
so it is done once, and only on glibc; ``FMFAST_CPU_MALLOC=0``, or either of glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment, leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit (4 M x sizeof(long)); above it mallopt fails
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: at INT_MAX a heap is in practice never trimmed


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> tuple[bool, str]:
    """Once per process (see the module docstring) -> (True, what was set) or (False, why not)."""
    ask = os.environ.get("FMFAST_CPU_MALLOC", "auto")
    if ask not in ("auto", "0"):
        return False, f"malloc left alone: FMFAST_CPU_MALLOC={ask!r} is not one of auto, 0"
    if ask == "0":
        return False, "malloc left alone (FMFAST_CPU_MALLOC=0)"
    own = [v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if v in os.environ]
    if own:
        return False, f"malloc left alone: {own[0]} is set"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False, "malloc left alone: not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False, "malloc left alone: no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False, "malloc left alone: mallopt refused"
    return True, "freed memory kept for reuse (malloc)"
