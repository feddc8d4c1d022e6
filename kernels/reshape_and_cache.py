"""Write the new tokens' keys and values into the paged KV cache at their slots.

Layouts: key, value [T, H_kv, D]; key_cache, value_cache [num_blocks, block_size, H_kv, D];
slot_mapping [T] (int64): token t goes to block slot // block_size, offset slot % block_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import next_power_of_2


def reshape_and_cache_ref(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    heads, dim = key.shape[1], key.shape[2]
    key_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


@triton.jit
def _reshape_and_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, row: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < row
    src = token.to(tl.int64) * row + offsets
    dst = slot * row + offsets
    tl.store(key_cache_ptr + dst, tl.load(key_ptr + src, mask=mask), mask=mask)
    tl.store(value_cache_ptr + dst, tl.load(value_ptr + src, mask=mask), mask=mask)


def reshape_and_cache_triton(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    tokens, heads, dim = key.shape
    assert key.is_contiguous() and value.is_contiguous() and value.shape == key.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous() and key_cache.shape == value_cache.shape
    assert key_cache.shape[2:] == (heads, dim), f"cache rows {tuple(key_cache.shape[2:])} != tokens' {(heads, dim)}"
    assert key.dtype == key_cache.dtype, "cast the new keys and values to the cache's dtype first"
    assert slot_mapping.shape == (tokens,) and slot_mapping.dtype == torch.int64
    if tokens == 0:
        return
    row = heads * dim
    _reshape_and_cache_kernel[(tokens,)](key, value, key_cache, value_cache, slot_mapping, row, BLOCK=next_power_of_2(row))
