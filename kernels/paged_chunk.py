"""The inner step both paged attention kernels share: read a chunk of a sequence's context
through its block table, and fold it into a running softmax (flash-attention style).

For queries q [M, D] and context positions `pos` [N], with running max m, sum l and output acc:
s = scale * q K^T (masked to -inf where not `visible`), m' = max(m, max_j s), and
acc' = acc e^(m - m') + e^(s - m') V, l' = l e^(m - m') + sum_j e^(s - m'). At the end acc / l is
the softmax-weighted sum over every chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.quant import e4m3_decode


@triton.jit
def load_kv_chunk(
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq,
    pos,
    valid,
    kv_head,
    d,
    stride_table,
    stride_cache_slot,
    stride_cache_head,
    k_scale,
    v_scale,
    DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    """K and V [N, BLOCK_D] of context positions `pos` (zero where not `valid`).

    With FP8 the caches hold float8 e4m3fn codes (passed as uint8), and K and V come back in
    float32 as code x k_scale and code x v_scale; otherwise in the cache's dtype, unscaled.
    """
    block = tl.load(block_tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    offsets = slot[:, None] * stride_cache_slot + kv_head * stride_cache_head + d[None, :]
    mask = valid[:, None] & (d[None, :] < DIM)
    k = tl.load(k_cache_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offsets, mask=mask, other=0.0)
    if FP8:
        k = e4m3_decode(k).to(tl.float32) * k_scale
        v = e4m3_decode(v).to(tl.float32) * v_scale
    return k, v


@triton.jit
def fold_chunk(q, k, v, visible, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """One online-softmax step over a chunk; returns the new (m, l, acc)."""
    if IEEE:
        scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    else:
        scores = tl.dot(q, tl.trans(k)) * scale
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_new, acc
