"""A rank keeps the host memory it frees: with glibc's thresholds raised, a block of a few MiB
comes from the heap (below the program break), not from a mapping of its own that every free
hands back to the kernel."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
def from_heap():
    block = libc.malloc(4 << 20)
    return block < libc.sbrk(0)
before = from_heap()
if sys.argv[1] == "keep":
    from workers.host_malloc import keep_freed_memory
    assert keep_freed_memory()
print(before, from_heap())
"""


def run(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


def test_a_few_mib_come_from_the_heap_once_the_thresholds_are_raised() -> None:
    assert run("default") == ["False", "False"]  # glibc's own thresholds: a mapping per block
    assert run("keep") == ["False", "True"]
