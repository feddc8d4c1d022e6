"""Paged attention for decoding: one query token per sequence, keys and values read through the
sequence's block table.

For sequence b and query head h (key/value head h // G, with G = H / H_kv query heads per
key/value head), over the context positions j < L_b:

    out[b, h] = sum_j softmax_j(scale * q[b, h] . K[b, j]) V[b, j],
    K[b, j] = key_cache[block_tables[b, j // block_size], j % block_size, h // G]   (V likewise)

Layouts: q [B, H, D]; key_cache, value_cache [num_blocks, block_size, H_kv, D];
block_tables [B, max_blocks] (int32); context_lens [B] (int32, >= 1). The torch reference reads
slot 0 for positions past a context: block 0 must hold finite values (the engine keeps it zero).

A float8_e4m3fn cache holds K / k_scale and V / v_scale (kernels.reshape_and_cache): it is read as
K = fp8 x k_scale and V = fp8 x v_scale, in q's dtype. Other caches ignore the scales.

On CPU the engine runs `paged_decode_attention_blocks`: the same maths as the reference, with the
contexts gathered a whole block at a time (one copy of block_size x H_kv x D values per block
instead of one per position) following a plan made once per step (`decode_block_plan`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import exact_dots, next_power_of_2
from kernels.paged_chunk import fold_chunk, load_kv_chunk
from kernels.quant import dequantize_fp8, is_fp8


def context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """The cache slot of each of the first `length` positions of each sequence: [B, length]."""
    positions = torch.arange(length, device=block_tables.device)
    blocks = block_tables[:, positions // block_size].long()
    return blocks * block_size + positions % block_size


def decode_gather_plan(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [B, L], visible [B, 1, 1, L]) for the longest context L: what the reference reads.

    Positions past a sequence's context read slot 0, whose block the cache keeps zero: a
    masked-out position must not bring uninitialised memory (NaN) into the weighted sum. The plan
    is the same for every layer of a step, so the engine makes it once per step.
    """
    longest = int(context_lens.max())
    visible = torch.arange(longest, device=block_tables.device)[None, :] < context_lens[:, None].long()
    slots = context_slots(block_tables, longest, block_size).masked_fill(~visible, 0)
    return slots, visible[:, None, None, :]


def paged_decode_attention_gathered(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The reference's maths given its gather plan: gather each context, then masked attention."""
    batch, heads, dim = q.shape
    kv_heads = key_cache.shape[2]
    keys = dequantize_fp8(key_cache.view(-1, kv_heads, dim)[slots], k_scale, q.dtype).transpose(1, 2)  # [B, H_kv, L, D]
    values = dequantize_fp8(value_cache.view(-1, kv_heads, dim)[slots], v_scale, q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
    return out.view(batch, heads, dim)


def paged_decode_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    slots, visible = decode_gather_plan(block_tables, context_lens, key_cache.shape[1])
    return paged_decode_attention_gathered(q, key_cache, value_cache, slots, visible, scale, k_scale=k_scale, v_scale=v_scale)


class DecodeBlockPlan(NamedTuple):
    """What `paged_decode_attention_blocks` reads, the same for every layer of a step.

    With nb the most blocks any context of the batch covers, gathering the blocks `blocks` lays
    every context out at [b, 0 : nb * block_size]; attention reads positions j < L = max_b L_b of
    it, with j >= L_b masked out (`visible`): the reference's very inputs, so its very results.
    """

    blocks: torch.Tensor
    """[B * nb] int64: sequence b's first ceil(L_b / block_size) block ids, then the null block 0."""
    tail: torch.Tensor
    """[n] int64: the positions b * nb * block_size + j of that layout with L_b <= j < L in b's last
    block: slots no token of this context was written to (stale, or never written: maybe NaN),
    zeroed after the gather, as the reference reads the null block there."""
    visible: torch.Tensor | None
    """[B, 1, 1, L] bool: j < L_b; or the same as SDPA's additive mask (0 where visible, else -inf)
    in q's dtype, which SDPA would otherwise make from the bool mask in every layer; None when
    every context has length L (nothing to mask: adding 0 changes no score)."""
    length: int
    """L, the longest context."""
    pair_rows: torch.Tensor | None = None
    """[2 * B * nb] int64, for a [2, num_blocks, ...] pool pair: `blocks`, then `blocks` +
    num_blocks (the same blocks of the value half), so that one gather along the pair's flattened
    first two dimensions reads keys and values (1.5 times faster here than along its second)."""
    pair_blocks: int = 0
    """The num_blocks `pair_rows` was made for."""


def decode_block_plan_np(
    block_tables: np.ndarray, context_lens: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`DecodeBlockPlan`'s (blocks, tail, visible) as numpy arrays, from block_tables [B, >= nb] and context_lens [B]."""
    lens = context_lens.astype(np.int64)
    used = (lens + block_size - 1) // block_size
    width, longest = int(used.max()), int(lens.max())
    blocks = np.where(np.arange(width) < used[:, None], block_tables[:, :width], 0).astype(np.int64).reshape(-1)
    position = np.arange(width * block_size)
    visible = position < lens[:, None]
    tail = np.flatnonzero(~visible & (position < np.minimum(used * block_size, longest)[:, None]))
    return blocks, tail, visible[:, None, None, :longest]


def additive_mask(visible: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's additive form of a bool mask: 0 where visible, -inf elsewhere, in `dtype`."""
    return torch.from_numpy(np.where(visible, np.float32(0), np.float32(-np.inf))).to(dtype)


def decode_block_plan(
    block_tables: torch.Tensor | np.ndarray,
    context_lens: torch.Tensor | np.ndarray,
    block_size: int,
    mask_dtype: torch.dtype | None = None,
    num_blocks: int = 0,
) -> DecodeBlockPlan:
    """The plan for CPU block_tables [B, max_blocks] and context_lens [B] (tensors or numpy arrays),
    its mask additive in `mask_dtype` when one is given, its `pair_rows` for a pool pair of
    `num_blocks` blocks when one is given."""
    as_np = lambda t: t.numpy() if isinstance(t, torch.Tensor) else t  # noqa: E731
    blocks, tail, visible = decode_block_plan_np(as_np(block_tables), as_np(context_lens), block_size)
    mask = None
    if not visible.all():
        mask = torch.from_numpy(np.ascontiguousarray(visible))
        if mask_dtype is not None:
            mask = additive_mask(visible, mask_dtype)
    rows = torch.from_numpy(np.concatenate([blocks, blocks + num_blocks])) if num_blocks else None
    return DecodeBlockPlan(torch.from_numpy(blocks), torch.from_numpy(tail), mask, visible.shape[-1], rows, num_blocks)


def _gather_blocks(cache: torch.Tensor, plan: DecodeBlockPlan) -> torch.Tensor:
    """The plan's blocks of one pool, [B * nb * block_size, H_kv, D], tails zeroed (a float8 pool as
    bytes: code 0 is +0)."""
    codes = cache.view(torch.uint8) if is_fp8(cache) else cache
    gathered = codes.index_select(0, plan.blocks).view(-1, *cache.shape[2:])
    if len(plan.tail):
        gathered.index_fill_(0, plan.tail, 0)
    return gathered.view(cache.dtype)


def paged_decode_attention_blocks(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: DecodeBlockPlan,
    scale: float,
    *,
    kv_pair: torch.Tensor | None = None,
    kv_rows: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The reference's maths over contexts gathered by block (`DecodeBlockPlan`); `kv_pair`
    [2, num_blocks, block_size, H_kv, D], when the two pools are its halves, lets one gather read
    both (`kv_rows`: the pair viewed as [2 * num_blocks, block elements], where the caller keeps
    that view). A small step's time is mostly the ops' own cost, so this path makes few."""
    batch, heads, dim = q.shape
    kv_heads, length = key_cache.shape[2], plan.length
    if kv_pair is not None and not is_fp8(kv_pair):
        if plan.pair_rows is not None and plan.pair_blocks == kv_pair.shape[1] and kv_pair.is_contiguous():
            rows = kv_rows if kv_rows is not None else kv_pair.view(2 * plan.pair_blocks, -1)
            kv = rows.index_select(0, plan.pair_rows)
        else:
            kv = kv_pair.index_select(1, plan.blocks)
        if len(plan.tail):
            kv.view(2, -1, kv_heads, dim).index_fill_(1, plan.tail, 0)
        kv = kv.view(2, batch, -1, kv_heads, dim).narrow(2, 0, length).transpose(2, 3)  # [2, B, H_kv, L, D]
        keys, values = (kv if kv.dtype == q.dtype else kv.to(q.dtype)).unbind(0)
    else:
        keys = dequantize_fp8(_gather_blocks(key_cache, plan), k_scale, q.dtype)
        values = dequantize_fp8(_gather_blocks(value_cache, plan), v_scale, q.dtype)
        keys = keys.view(batch, -1, kv_heads, dim)[:, :length].transpose(1, 2)  # [B, H_kv, L, D]
        values = values.view(batch, -1, kv_heads, dim)[:, :length].transpose(1, 2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=plan.visible, scale=scale, enable_gqa=True)
    return out.view(batch, heads, dim)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    scale,
    k_scale,
    v_scale,
    stride_q_seq,
    stride_q_head,
    stride_cache_slot,
    stride_cache_head,
    stride_table,
    GROUP: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    q_mask = (g[:, None] < GROUP) & (d[None, :] < DIM)
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, context, BLOCK_N):
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
        m_i, l_i, acc = fold_chunk(q, k.to(q.dtype), v.to(q.dtype), valid[None, :], m_i, l_i, acc, scale, IEEE)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask
    )


def paged_decode_attention_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    batch, heads, dim = q.shape
    _, block_size, kv_heads, cache_dim = key_cache.shape
    assert q.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous(), "q and the caches must be contiguous"
    assert cache_dim == dim and heads % kv_heads == 0, f"q {tuple(q.shape)} does not fit a cache of {kv_heads} x {cache_dim}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == batch, (
        f"block_tables must be int32 [{batch}, max_blocks], not {block_tables.dtype} {tuple(block_tables.shape)}"
    )
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert context_lens.dtype == torch.int32 and context_lens.shape == (batch,), f"context_lens must be int32 [{batch}]"
    assert value_cache.dtype == key_cache.dtype
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = heads // kv_heads
    fp8 = is_fp8(key_cache)
    if fp8:
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    _paged_decode_kernel[(batch, kv_heads)](
        q,
        key_cache,
        value_cache,
        block_tables,
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
        GROUP=group,
        DIM=dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_N=32,
        IEEE=exact_dots(q),
        FP8=fp8,
    )
    return out
