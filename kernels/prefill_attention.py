"""Prefill attention: a sequence's new tokens attend to its whole cached context, causally.

Sequence s brings Q_s new tokens whose keys and values are already in the cache; with L_s
tokens cached in all, new token i sits at position p = L_s - Q_s + i and attends to positions
j <= p. That serves a whole prompt (Q_s = L_s), a chunk of a long prompt after earlier chunks,
and a preempted sequence being recomputed.

Layouts: q [T, H, D] (the new tokens of every sequence, back to back); key_cache, value_cache
[num_blocks, block_size, H_kv, D]; block_tables [S, max_blocks] (int32); query_start [S + 1]
(int32, cumulative Q_s); context_lens [S] (int32, L_s).

A float8_e4m3fn cache holds K / k_scale and V / v_scale (kernels.reshape_and_cache): it is read as
K = fp8 x k_scale and V = fp8 x v_scale, in q's dtype. Other caches ignore the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import exact_dots, next_power_of_2
from kernels.paged_chunk import fold_chunk, load_kv_chunk
from kernels.paged_decode_attention import context_slots
from kernels.quant import dequantize_fp8, is_fp8


def prefill_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    out = torch.empty_like(q)
    starts, lengths = query_start.tolist(), context_lens.tolist()
    for s, length in enumerate(lengths):
        first, last = starts[s], starts[s + 1]
        keys, values = _cached_context(key_cache, value_cache, block_tables[s], length, q.dtype, k_scale, v_scale)
        out[first:last] = _attend(q[first:last], keys, values, length, scale)
    return out


def prefill_attention_cpu(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    spans: tuple[tuple[int, int, int], ...],
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The reference's results, given the new tokens' own keys and values [T, H_kv, D] as they were
    written to the cache and each sequence's (first token, end, context length) in Python: a
    sequence whose context is all new (a whole prompt) reads them instead of gathering the cache,
    unless the cache is float8 (it attends to what the cache holds, as the reference does)."""
    out = torch.empty_like(q)
    fresh_ok = not is_fp8(key_cache)
    for s, (first, last, length) in enumerate(spans):
        if fresh_ok and last - first == length:
            keys, values = key[first:last].transpose(0, 1)[None], value[first:last].transpose(0, 1)[None]
        else:
            keys, values = _cached_context(key_cache, value_cache, block_tables[s], length, q.dtype, k_scale, v_scale)
        out[first:last] = _attend(q[first:last], keys, values, length, scale)
    return out


def _cached_context(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    table: torch.Tensor,
    length: int,
    dtype: torch.dtype,
    k_scale: float,
    v_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first `length` keys and values from the cache, [1, H_kv, length, D] in `dtype`
    (SDPA's fast CPU path wants a batch dimension)."""
    _, block_size, kv_heads, dim = key_cache.shape
    slots = context_slots(table[None], length, block_size)[0]
    keys = dequantize_fp8(key_cache.view(-1, kv_heads, dim)[slots], k_scale, dtype).transpose(0, 1)[None]
    values = dequantize_fp8(value_cache.view(-1, kv_heads, dim)[slots], v_scale, dtype).transpose(0, 1)[None]
    return keys, values


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """New tokens [Q, H, D] at the last Q of `length` positions attending causally to keys and values [1, H_kv, length, D]."""
    new = queries.shape[0]
    queries = queries.transpose(0, 1)[None]
    if new == length:
        attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        positions = torch.arange(length, device=queries.device)
        visible = positions[None, :] <= positions[length - new :, None]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
    return attended[0].transpose(0, 1)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    out_ptr,
    scale,
    k_scale,
    v_scale,
    stride_q_tok,
    stride_q_head,
    stride_cache_slot,
    stride_cache_head,
    stride_table,
    GROUP: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    first = tl.load(query_start_ptr + seq)
    new = tl.load(query_start_ptr + seq + 1) - first
    if m_block * BLOCK_M >= new:
        return
    context = tl.load(context_lens_ptr + seq)
    offset = context - new
    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_mask = (m[:, None] < new) & (d[None, :] < DIM)
    q_offsets = (first + m)[:, None].to(tl.int64) * stride_q_tok + head * stride_q_head + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    q_pos = offset + m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(context, offset + (m_block + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < context
        k, v = load_kv_chunk(
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
            DIM,
            BLOCK_SIZE,
            FP8,
        )
        visible = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
        m_i, l_i, acc = fold_chunk(q, k.to(q.dtype), v.to(q.dtype), visible, m_i, l_i, acc, scale, IEEE)
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, cache_dim = key_cache.shape
    seqs = context_lens.shape[0]
    assert q.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous(), "q and the caches must be contiguous"
    assert cache_dim == dim and heads % kv_heads == 0, f"q {tuple(q.shape)} does not fit a cache of {kv_heads} x {cache_dim}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == seqs and block_tables.stride(1) == 1, (
        f"block_tables must be int32 [{seqs}, max_blocks] with contiguous rows"
    )
    assert query_start.dtype == torch.int32 and query_start.shape == (seqs + 1,), f"query_start must be int32 [{seqs + 1}]"
    assert context_lens.dtype == torch.int32, "context_lens must be int32"
    assert value_cache.dtype == key_cache.dtype
    out = torch.empty_like(q)
    if seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start[1:] - query_start[:-1]).max())
    block_m = 16 if max_query_len <= 16 else 64
    grid = (seqs, triton.cdiv(max_query_len, block_m), heads)
    fp8 = is_fp8(key_cache)
    if fp8:
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    _prefill_kernel[grid](
        q,
        key_cache,
        value_cache,
        block_tables,
        query_start,
        context_lens,
        out,
        scale,
        k_scale,
        v_scale,
        q.stride(0),
        q.stride(1),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        GROUP=heads // kv_heads,
        DIM=dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_N=32,
        IEEE=exact_dots(q),
        FP8=fp8,
    )
    return out
