"""Write the new tokens' keys and values into the paged KV cache at their slots.

Layouts: key, value [T, H_kv, D]; key_cache, value_cache [num_blocks, block_size, H_kv, D];
slot_mapping [T] (int64): token t goes to block slot // block_size, offset slot % block_size.

A float8_e4m3fn cache (kv_cache_dtype="fp8") stores clamp(key x (1 / k_scale), +-448) rounded to
nearest even, and values likewise with v_scale; the attention kernels read fp8 x k_scale back. The
keys and values then come in their compute dtype. Any other cache stores them as they are (cast
to the cache's dtype first), and the scales play no part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import next_power_of_2
from kernels.quant import e4m3_encode, is_fp8, quantize_fp8


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    heads, dim = key.shape[1], key.shape[2]
    if is_fp8(key_cache):
        # index_copy_ has no float8 kernel: copy the codes as bytes
        key_cache.view(torch.uint8).view(-1, heads, dim).index_copy_(
            0, slot_mapping, quantize_fp8(key, k_scale).view(torch.uint8)
        )
        value_cache.view(torch.uint8).view(-1, heads, dim).index_copy_(
            0, slot_mapping, quantize_fp8(value, v_scale).view(torch.uint8)
        )
        return
    key_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    k_inv_scale,
    v_inv_scale,
    row: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < row
    src = token.to(tl.int64) * row + offsets
    dst = slot * row + offsets
    key = tl.load(key_ptr + src, mask=mask)
    value = tl.load(value_ptr + src, mask=mask)
    if FP8:
        key = e4m3_encode(key.to(tl.float32) * k_inv_scale)
        value = e4m3_encode(value.to(tl.float32) * v_inv_scale)
    tl.store(key_cache_ptr + dst, key, mask=mask)
    tl.store(value_cache_ptr + dst, value, mask=mask)


def reshape_and_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    tokens, heads, dim = key.shape
    fp8 = is_fp8(key_cache)
    assert key.is_contiguous() and value.is_contiguous() and value.shape == key.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous() and key_cache.shape == value_cache.shape
    assert key_cache.shape[2:] == (heads, dim), f"cache rows {tuple(key_cache.shape[2:])} != tokens' {(heads, dim)}"
    assert value_cache.dtype == key_cache.dtype
    if fp8:
        assert key.is_floating_point() and not is_fp8(key), "an fp8 cache takes keys and values in their compute dtype"
    else:
        assert key.dtype == key_cache.dtype, "cast the new keys and values to the cache's dtype first"
    assert slot_mapping.shape == (tokens,) and slot_mapping.dtype == torch.int64
    if tokens == 0:
        return
    if fp8:
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    row = heads * dim
    _reshape_and_cache_kernel[(tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        row,
        BLOCK=next_power_of_2(row),
        FP8=fp8,
    )
