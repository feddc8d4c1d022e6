"""Linear layer with int8 weights and one float32 scale per output channel (weight-only).

    y[m, n] = (sum_k x[m, k] W8[n, k]) s[n] + b[n],   W[n, k] ~ W8[n, k] s[n],  W8 in -127..127

Layouts: x [..., K]; weight [N, K] int8; scale [N] float32; bias [N] or None; y [..., N] in x's
dtype. Every int8 value is exact in bfloat16, float16 and float32, so the kernel converts the
weight tile to x's dtype and accumulates the dot products in float32.
"""

from __future__ import annotations

import torch

from kernels.quant import row_scales, scaled_weight_linear, scaled_weight_linear_ref

INT8_MAX = 127.0


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8, scale [N] float32): symmetric, scale[n] = max_k |w[n, k]| / 127,
    q = round(w / scale) (to nearest even) in -127..127. An all-zero row gets scale 1."""
    scale = row_scales(w.abs().amax(dim=1), INT8_MAX)
    q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return scaled_weight_linear_ref(x, weight, scale, bias)


def int8_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    n, k = weight.shape
    assert weight.dtype == torch.int8 and weight.is_contiguous(), "weight must be a contiguous int8 [N, K]"
    assert scale.dtype == torch.float32 and scale.shape == (n,), f"scale must be float32 [{n}]"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), f"bias must be [{n}]"
    return scaled_weight_linear(x, weight, scale, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda:
        return int8_linear_triton(x, weight, scale, bias)
    return int8_linear_ref(x, weight, scale, bias)
