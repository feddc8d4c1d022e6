"""Linear layer with int8 weights and one float32 scale per output channel (weight-only).

    y[m, n] = (sum_k x[m, k] W8[n, k]) s[n] + b[n],   W[n, k] ~ W8[n, k] s[n],  W8 in -127..127

Layouts: x [..., K]; weight [N, K] int8; scale [N] float32; bias [N] or None; y [..., N] in x's
dtype. Every int8 value is exact in bfloat16, float16 and float32, so the kernel converts the
weight tile to x's dtype and accumulates the dot products in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import exact_dots
from kernels.quant import as_rows, linear_blocks, row_scales

INT8_MAX = 127.0


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8, scale [N] float32): symmetric, scale[n] = max_k |w[n, k]| / 127,
    q = round(w / scale) (to nearest even) in -127..127. An all-zero row gets scale 1."""
    scale = row_scales(w.abs().amax(dim=1), INT8_MAX)
    q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = F.linear(x, weight.to(x.dtype)) * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # the [BLOCK_K, BLOCK_N] tile of W^T
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * K + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        if IEEE:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    y = acc * tl.load(scale_ptr + n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None].to(tl.int64) * N + n[None, :], y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    n, k = weight.shape
    assert weight.dtype == torch.int8 and weight.is_contiguous(), "weight must be a contiguous int8 [N, K]"
    assert scale.dtype == torch.float32 and scale.shape == (n,), f"scale must be float32 [{n}]"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), f"bias must be [{n}]"
    x2 = as_rows(x, k)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], n)
    block_m, block_n, block_k, stages = linear_blocks(x2.shape[0], n, x2.element_size())
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
    _int8_linear_kernel[grid](
        x2, weight, scale, bias if bias is not None else scale, out,
        x2.shape[0], n, k,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=exact_dots(x2),
        num_stages=stages,
    )
    return out.view(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda:
        return int8_linear_triton(x, weight, scale, bias)
    return int8_linear_ref(x, weight, scale, bias)
