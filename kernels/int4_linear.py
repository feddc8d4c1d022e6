"""Linear layer with 4-bit weights in groups along the input dimension: the one layout GPTQ and
AWQ checkpoints are converted into at load time.

    W[n, k] = (q[k, n] - zeros[g_idx[k], n]) scales[g_idx[k], n],   y = x W^T + b

Layouts:
- qweight [K // 8, N] int32: nibble i (bits 4i..4i+3) of qweight[r, n] is q[8r + i, n], 0..15
  (GPTQ's qweight layout).
- scales, zeros [G, N] (float16, bfloat16 or float32, the same for both): zeros holds the zero
  point itself, 0..15 (no offset).
- g_idx [K] int32: the group of input row k, k // group_size without act-order, any order with it.
- x [..., K], bias [N] or None, y [..., N] in x's dtype.

Shifting a signed int32 right copies its sign bit down, so every nibble is masked with 0xF after
the shift; then bit 31 never leaks into a value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import exact_dots
from kernels.quant import as_rows, linear_blocks

PACK = 8
"""Nibbles per int32 word."""
INT4_BLOCK_K = 128
"""Rows of K per tile."""


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """values [K, N] (integers 0..15) -> qweight [K // 8, N] int32, nibble i of word r = row 8r + i."""
    rows, cols = values.shape
    assert rows % PACK == 0, f"K = {rows} must be a multiple of {PACK}"
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    words = (values.to(torch.int64).view(rows // PACK, PACK, cols) << shifts[None, :, None]).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as a signed int32
    return words.to(torch.int32)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [K // 8, N] int32 -> q [K, N] int32 in 0..15."""
    words, cols = qweight.shape
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).view(words * PACK, cols)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The float weight W [N, K] in `dtype` (computed in float32, rounded once)."""
    q = unpack_int4_rows(qweight).float()
    groups = g_idx.long()
    w = (q - zeros[groups].float()) * scales[groups].float()  # [K, N]
    return w.t().to(dtype)


def int4_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales, zeros, g_idx, x.dtype), bias)


@triton.jit
def _int4_linear_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    GROUPED: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_mask = k < K
        tile_mask = k_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # [BLOCK_K, BLOCK_N] of W^T: each packed word serves 8 consecutive rows k
        words = tl.load(qweight_ptr + (k // 8)[:, None].to(tl.int64) * N + n[None, :], mask=tile_mask, other=0)
        q = (words >> ((k % 8) * 4)[:, None]) & 0xF
        if GROUPED:
            # the whole tile lies in group start // GROUP, so sum_k x_k (q_kn - z_n) s_n
            # = s_n (x . q_n - z_n sum_k x_k): one scale and one zero per output and tile
            params = (start // GROUP) * N + n
            scale = tl.load(scales_ptr + params, mask=n_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + params, mask=n_mask, other=0.0).to(tl.float32)
            if IEEE:
                xq = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                xq = tl.dot(x, q.to(x.dtype))  # 0..15 are exact in every float type
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += (xq - x_sum[:, None] * zero[None, :]) * scale[None, :]
        else:
            group = tl.load(g_idx_ptr + k, mask=k_mask, other=0).to(tl.int64)
            params = group[:, None] * N + n[None, :]
            scale = tl.load(scales_ptr + params, mask=tile_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + params, mask=tile_mask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - zero) * scale
            if IEEE:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + m[:, None].to(tl.int64) * N + n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def grouped_block_k(group_size: int | None) -> int | None:
    """The K tile for contiguous groups of `group_size` rows: the largest power of two up to
    INT4_BLOCK_K that divides it, so that no tile straddles two groups (None: none of 16 or more)."""
    if not group_size:
        return None
    block = INT4_BLOCK_K
    while block >= 16 and group_size % block:
        block //= 2
    return block if block >= 16 else None


def int4_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Two kernels in one, accumulating in float32:
    - `group_size` given (the caller promises g_idx[k] = k // group_size: contiguous groups, as
      without act-order, or with it once the rows are sorted by group): no K tile straddles two
      groups, so the tile's products are taken on the raw 4-bit values and scaled once per
      output, s_n (x . q_n - z_n sum x), loading one scale and zero per output and tile.
    - otherwise each weight is dequantized in the tile, its scale and zero gathered through
      g_idx: general, and slow (8 bytes of parameters loaded per 4-bit weight); on an H200 it ran
      4 to 7 times slower than bfloat16 F.linear at M = 1 and 64 (kernels/bench.py).
    """
    words, n = qweight.shape
    k = words * PACK
    assert qweight.dtype == torch.int32 and qweight.is_contiguous(), "qweight must be a contiguous int32 [K // 8, N]"
    assert scales.is_contiguous() and zeros.is_contiguous() and scales.shape == zeros.shape and scales.shape[1] == n, (
        f"scales and zeros must be contiguous [G, {n}], not {tuple(scales.shape)} and {tuple(zeros.shape)}"
    )
    assert g_idx.dtype == torch.int32 and g_idx.shape == (k,), f"g_idx must be int32 [{k}]"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), f"bias must be [{n}]"
    x2 = as_rows(x, k)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], n)
    block_m, block_n, _, _ = linear_blocks(x2.shape[0], n, x2.element_size())
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
    block_k = grouped_block_k(group_size)
    _int4_linear_kernel[grid](
        x2,
        qweight,
        scales,
        zeros,
        g_idx,
        bias if bias is not None else scales,
        out,
        x2.shape[0],
        n,
        k,
        group_size or 1,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k or INT4_BLOCK_K,
        IEEE=exact_dots(x2),
        GROUPED=block_k is not None,
        num_stages=2,  # words, scales and zeros per weight: large tiles, so two stages fit for float32 x too
    )
    return out.view(*x.shape[:-1], n)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """`group_size`: see `int4_linear_triton` (the torch path reads g_idx either way)."""
    if x.is_cuda:
        return int4_linear_triton(x, qweight, scales, zeros, g_idx, bias, group_size)
    return int4_linear_ref(x, qweight, scales, zeros, g_idx, bias)
