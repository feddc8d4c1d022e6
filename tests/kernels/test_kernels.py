"""Each Triton kernel against its torch reference (on CPU under TRITON_INTERPRET=1: small sizes).

Tolerances: in float32 both sides sum the same products in another order (the kernel in blocks
with an online softmax), so they agree to a few ulps, 1e-5 here; bfloat16 keeps 8 bits of
mantissa, so 2e-2.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.paged_decode_attention import paged_decode_attention_ref, paged_decode_attention_triton
from kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton
from kernels.reshape_and_cache import reshape_and_cache_ref, reshape_and_cache_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def paged_setup(block_size: int, kv_heads: int, dim: int, lengths: list[int], dtype, seed: int = 0):
    """A cache as the engine keeps it: block 0 zero (the null block), blocks handed out in shuffled
    order, and NaN wherever nothing was written (unused blocks, the tails of last blocks), which
    no kernel may let into a result."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3
    order = list(range(1, num_blocks))
    rng.shuffle(order)
    tables = torch.zeros(len(lengths), max(needed), dtype=torch.int32)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for s, (count, length) in enumerate(zip(needed, lengths)):
        tables[s, :count] = torch.tensor([order.pop() for _ in range(count)])
        for pos in range(length):
            written[tables[s, pos // block_size], pos % block_size] = True
    caches = []
    for _ in range(2):
        cache = torch.randn(num_blocks, block_size, kv_heads, dim).masked_fill(~written[:, :, None, None], float("nan"))
        cache[0] = 0.0
        caches.append(cache.to(dtype))
    return caches[0], caches[1], tables


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache(block_size, dtype) -> None:
    torch.manual_seed(1)
    kv_heads, dim, tokens = 2, 16, 11
    key_cache = torch.zeros(6, block_size, kv_heads, dim, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(6 * block_size)[:tokens]
    key, value = torch.randn(tokens, kv_heads, dim).to(dtype), torch.randn(tokens, kv_heads, dim).to(dtype)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots)
    reshape_and_cache_triton(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    block, offset = int(slots[3]) // block_size, int(slots[3]) % block_size
    assert torch.equal(key_cache[block, offset], key[3])


@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention(block_size, heads, kv_heads, dtype) -> None:
    lengths = [1, 7, 33, 70]
    dim = 16
    key_cache, value_cache, tables = paged_setup(block_size, kv_heads, dim, lengths, dtype)
    q = torch.randn(len(lengths), heads, dim).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    expected = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, dim**-0.5)
    got = paged_decode_attention_triton(q, key_cache, value_cache, tables, lens, dim**-0.5)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_reference_is_plain_attention() -> None:
    """The reference itself against attention written out on the gathered context."""
    key_cache, value_cache, tables = paged_setup(8, 2, 16, [13], torch.float32)
    q = torch.randn(1, 4, 16)
    out = paged_decode_attention_ref(q, key_cache, value_cache, tables, torch.tensor([13], dtype=torch.int32), 0.25)
    slots = [int(tables[0, j // 8]) * 8 + j % 8 for j in range(13)]
    keys = key_cache.view(-1, 2, 16)[slots]
    values = value_cache.view(-1, 2, 16)[slots]
    for h in range(4):
        weights = torch.softmax(keys[:, h // 2] @ q[0, h] * 0.25, dim=0)
        torch.testing.assert_close(out[0, h], weights @ values[:, h // 2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("block_size", [8, 16, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_against_cached_context(block_size, heads, kv_heads, dtype) -> None:
    # (new tokens, context): a whole prompt, a later chunk, one new token, a long chunk
    shapes = [(5, 5), (6, 20), (1, 9), (40, 45)]
    dim = 16
    key_cache, value_cache, tables = paged_setup(block_size, kv_heads, dim, [c for _, c in shapes], dtype, seed=2)
    starts = [0]
    for new, _ in shapes:
        starts.append(starts[-1] + new)
    q = torch.randn(starts[-1], heads, dim).to(dtype)
    query_start = torch.tensor(starts, dtype=torch.int32)
    lens = torch.tensor([c for _, c in shapes], dtype=torch.int32)
    expected = prefill_attention_ref(q, key_cache, value_cache, tables, query_start, lens, dim**-0.5)
    got = prefill_attention_triton(q, key_cache, value_cache, tables, query_start, lens, dim**-0.5)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_reference_matches_decode_for_single_tokens() -> None:
    """One new token attending its cached context is exactly a decode step."""
    key_cache, value_cache, tables = paged_setup(16, 2, 16, [3, 30], torch.float32, seed=4)
    q = torch.randn(2, 4, 16)
    lens = torch.tensor([3, 30], dtype=torch.int32)
    prefill = prefill_attention_ref(q, key_cache, value_cache, tables, torch.tensor([0, 1, 2], dtype=torch.int32), lens, 0.3)
    decode = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, 0.3)
    torch.testing.assert_close(prefill, decode, atol=1e-6, rtol=1e-6)


def test_wrappers_refuse_layouts_they_do_not_handle() -> None:
    key_cache, value_cache, tables = paged_setup(16, 2, 16, [5], torch.float32)
    q = torch.randn(1, 4, 16)
    with pytest.raises(AssertionError, match="block_tables must be int32"):
        paged_decode_attention_triton(q, key_cache, value_cache, tables.long(), torch.tensor([5], dtype=torch.int32), 1.0)
    with pytest.raises(AssertionError, match="does not fit"):
        paged_decode_attention_triton(torch.randn(1, 3, 16), key_cache, value_cache, tables, torch.tensor([5], dtype=torch.int32), 1.0)
    with pytest.raises(AssertionError, match="contiguous"):
        paged_decode_attention_triton(torch.randn(1, 16, 4).transpose(1, 2), key_cache, value_cache, tables, torch.tensor([5], dtype=torch.int32), 1.0)
