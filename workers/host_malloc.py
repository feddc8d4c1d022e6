"""A rank keeps the host memory it frees for its next step (glibc's malloc).

A step allocates and frees the same large temporaries every layer (a decode step at a
2,000-token context gathers 3 MB of keys and values per layer). glibc hands memory above its
trim threshold back to the kernel as soon as it is freed, and serves blocks above its mmap
threshold with fresh mappings; both thresholds start small and only grow as the process frees
larger blocks. Every such allocation then costs a page fault per 4 KiB it touches again: in the
engine a SmolLM2 decode step at a 2,000-token context took 100 - 130 ms, against 52 - 61 ms
for the same step in a process that had run warm (`shardlm bench prefix`: the repeated prompt's
second answer 1.02 - 1.07 s, 0.57 s with the thresholds raised).

So a rank raises both once at start (`mallopt`): blocks below 32 MiB (glibc's largest mmap
threshold) come from the heap, and up to 1 GiB of freed heap stays with the process. Large
buffers (the KV pool, weight arenas) are still mapped and unmapped on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(f"shardlm.{__name__}")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 1 << 30
MMAP_BYTES = 32 << 20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts: mallopt refuses more."""


def keep_freed_memory(trim_bytes: int = TRIM_BYTES, mmap_bytes: int = MMAP_BYTES) -> bool:
    """Raise glibc's trim and mmap thresholds for this process; False where there is no glibc
    malloc to tune (musl, macOS) or it refused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1 and mallopt(M_MMAP_THRESHOLD, mmap_bytes) == 1
    if not done:
        logger.debug("glibc's mallopt refused the trim and mmap thresholds: freed host memory goes back at once")
    return done
