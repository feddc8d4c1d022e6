"""Triton kernels, one per file, each beside a plain-torch reference of the same maths.

On CUDA the engine runs the Triton kernels; on CPU it runs the references. The tests run the
Triton kernels on CPU under TRITON_INTERPRET=1 at small sizes and compare them with the
references.
"""

from __future__ import annotations

import os

import torch


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def exact_dots(t: torch.Tensor) -> bool:
    """Whether a kernel's dot products run in float32 with IEEE rounding: for float32 inputs (no
    TF32), and always under the interpreter, whose half-precision dot products are wrong. On a GPU
    with bfloat16 or float16 inputs they run on the tensor cores in that precision."""
    return t.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
