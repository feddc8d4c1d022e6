"""Storage for a model's parameters before loading fills it.

On CPU every byte of a freshly allocated parameter is first touched by the read that fills it,
and each 4 KiB page then costs a page fault: for a 0.5 GB model the faults take longer than
the reads. So CPU parameters are carved out of one arena aligned to 2 MiB and advised for
transparent huge pages (`madvise(MADV_HUGEPAGE)`; a no-op where the kernel has them off), which
takes 512 times fewer faults. Elsewhere each tensor gets its own `torch.empty`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(f"shardlm.{__name__}")

HUGE_PAGE = 2 * 2**20
ALIGNMENT = 64
"""Each tensor's first byte in the arena lies on a multiple of this (every dtype's alignment)."""
MADV_HUGEPAGE = 14
ARENA_MIN_BYTES = 8 * 2**20
"""Below this an arena gains nothing: tensors are allocated one by one."""


@functools.lru_cache(maxsize=1)
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for transparent huge pages over the 2 MiB-aligned part of a CPU tensor's memory."""
    madvise = _madvise()
    start, stop = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, stop // HUGE_PAGE * HUGE_PAGE
    if madvise is None or last <= first:
        return False
    return madvise(first, last - first, MADV_HUGEPAGE) == 0


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def empty_like_all(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Uninitialised tensors of the given shapes and dtypes on `device` (see the module docstring).

    Built with `torch.empty` from shape and dtype: `torch.empty_like` of a meta tensor goes through
    torch's reference implementations, which import sympy (half a second at every start).
    """
    sizes = [_aligned(t.numel() * t.element_size()) for t in tensors]
    if device.type != "cpu" or sum(sizes) < ARENA_MIN_BYTES:
        return [torch.empty(t.shape, dtype=t.dtype, device=device) for t in tensors]
    arena = torch.empty(sum(sizes) + HUGE_PAGE, dtype=torch.uint8)
    start = -arena.data_ptr() % HUGE_PAGE
    arena = arena[start : start + sum(sizes)]
    if not advise_huge_pages(arena):
        logger.debug("transparent huge pages not available for the parameters")
    out, offset = [], 0
    for t, size in zip(tensors, sizes):
        nbytes = t.numel() * t.element_size()
        out.append(arena[offset : offset + nbytes].view(t.dtype).view(t.shape))
        offset += size
    return out
