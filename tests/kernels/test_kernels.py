"""Each Triton kernel against its torch reference (on CPU under TRITON_INTERPRET=1: small sizes;
on a GPU when there is one).

Tolerances: in float32 both sides sum the same products in another order (the kernel in blocks
with an online softmax), so they agree to a few ulps, 1e-5 here; bfloat16 keeps 8 bits of
mantissa, so 2e-2. An FP8 cache is checked against the same maths on its dequantized copy, so the
same tolerances hold there; what float8 itself loses (2^-4 relative per element at most, 3
mantissa bits rounded to nearest) is checked where the cache is written.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.paged_decode_attention import (
    decode_block_plan,
    paged_decode_attention_blocks,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from kernels.prefill_attention import prefill_attention_cpu, prefill_attention_ref, prefill_attention_triton
from kernels.quant import FP8, FP8_MAX, dequantize_fp8, quantize_fp8
from kernels.reshape_and_cache import reshape_and_cache_ref, reshape_and_cache_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
        caches.append(cache.to(DEVICE, dtype))
    return caches[0], caches[1], tables.to(DEVICE)


def prefill_batch(shapes: list[tuple[int, int]], heads: int, dim: int, dtype):
    """(q [sum of new tokens, heads, dim], query_start, context lens) for (new tokens, context) pairs."""
    starts = [0]
    for new, _ in shapes:
        starts.append(starts[-1] + new)
    q = torch.randn(starts[-1], heads, dim).to(DEVICE, dtype)
    query_start = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([c for _, c in shapes], dtype=torch.int32, device=DEVICE)
    return q, query_start, lens


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache(block_size, dtype) -> None:
    torch.manual_seed(1)
    kv_heads, dim, tokens = 2, 16, 11
    key_cache = torch.zeros(6, block_size, kv_heads, dim, dtype=dtype, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(6 * block_size)[:tokens].to(DEVICE)
    key, value = torch.randn(tokens, kv_heads, dim).to(DEVICE, dtype), torch.randn(tokens, kv_heads, dim).to(DEVICE, dtype)
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
    q = torch.randn(len(lengths), heads, dim).to(DEVICE, dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    expected = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, dim**-0.5)
    got = paged_decode_attention_triton(q, key_cache, value_cache, tables, lens, dim**-0.5)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_reference_is_plain_attention() -> None:
    """The reference itself against attention written out on the gathered context."""
    key_cache, value_cache, tables = paged_setup(8, 2, 16, [13], torch.float32)
    q = torch.randn(1, 4, 16, device=DEVICE)
    out = paged_decode_attention_ref(
        q, key_cache, value_cache, tables, torch.tensor([13], dtype=torch.int32, device=DEVICE), 0.25
    )
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
    q, query_start, lens = prefill_batch(shapes, heads, dim, dtype)
    expected = prefill_attention_ref(q, key_cache, value_cache, tables, query_start, lens, dim**-0.5)
    got = prefill_attention_triton(q, key_cache, value_cache, tables, query_start, lens, dim**-0.5)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_reference_matches_decode_for_single_tokens() -> None:
    """One new token attending its cached context is exactly a decode step."""
    key_cache, value_cache, tables = paged_setup(16, 2, 16, [3, 30], torch.float32, seed=4)
    q = torch.randn(2, 4, 16, device=DEVICE)
    lens = torch.tensor([3, 30], dtype=torch.int32, device=DEVICE)
    prefill = prefill_attention_ref(
        q, key_cache, value_cache, tables, torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE), lens, 0.3
    )
    decode = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, 0.3)
    torch.testing.assert_close(prefill, decode, atol=1e-6, rtol=1e-6)


def test_wrappers_refuse_layouts_they_do_not_handle() -> None:
    key_cache, value_cache, tables = paged_setup(16, 2, 16, [5], torch.float32)
    q = torch.randn(1, 4, 16, device=DEVICE)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="block_tables must be int32"):
        paged_decode_attention_triton(q, key_cache, value_cache, tables.long(), lens, 1.0)
    with pytest.raises(AssertionError, match="does not fit"):
        paged_decode_attention_triton(torch.randn(1, 3, 16, device=DEVICE), key_cache, value_cache, tables, lens, 1.0)
    with pytest.raises(AssertionError, match="contiguous"):
        paged_decode_attention_triton(
            torch.randn(1, 16, 4, device=DEVICE).transpose(1, 2), key_cache, value_cache, tables, lens, 1.0
        )


# FP8 KV cache (kv_cache_dtype="fp8"): float8_e4m3fn codes, one scale per layer for K and one for V

FP8_SCALES = (0.005, 2.0)
"""k_scale and v_scale: for standard normal keys and values, a few keys saturate
(|k| / 0.005 > 448) and a few values land among the subnormal codes (|v| / 2 < 2^-6)."""


def fp8_caches(key_cache: torch.Tensor, value_cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(fp8 key cache, fp8 value cache, their dequantized copies in dtype): the NaN of unwritten
    slots stays NaN (code 0x7F) and block 0 stays zero."""
    k_scale, v_scale = FP8_SCALES
    key8, value8 = quantize_fp8(key_cache, k_scale), quantize_fp8(value_cache, v_scale)
    return key8, value8, dequantize_fp8(key8, k_scale, dtype), dequantize_fp8(value8, v_scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_fp8(dtype) -> None:
    """The Triton kernel writes the very codes torch's saturating cast gives (both round to
    nearest even), and each code is within 2^-4 relative (2^-10 x scale for subnormal codes) of
    the value it stores; saturated values read back as +-448 x scale."""
    torch.manual_seed(3)
    kv_heads, dim, tokens, block_size = 2, 16, 13, 8
    k_scale, v_scale = FP8_SCALES
    key_cache = torch.zeros(4, block_size, kv_heads, dim, dtype=FP8, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(4 * block_size)[:tokens].to(DEVICE)
    key, value = torch.randn(tokens, kv_heads, dim).to(DEVICE, dtype), torch.randn(tokens, kv_heads, dim).to(DEVICE, dtype)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots, k_scale=k_scale, v_scale=v_scale)
    reshape_and_cache_triton(key, value, key_cache, value_cache, slots, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(key_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(value_cache.view(torch.uint8), expected_v.view(torch.uint8))
    for new, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        stored = cache.view(-1, kv_heads, dim)[slots].float() * scale
        target = new.float().clamp(-FP8_MAX * scale, FP8_MAX * scale)
        assert ((stored - target).abs() <= 2**-4 * target.abs() + 2**-10 * scale).all()
    assert (key.float().abs() > FP8_MAX * k_scale).any() and (value.float().abs() < 2**-6 * v_scale).any()


def test_kv_scales_leave_other_caches_alone() -> None:
    """With a bfloat16 cache the scales play no part: writes and reads are those of today."""
    torch.manual_seed(5)
    key_cache, value_cache, tables = paged_setup(16, 2, 16, [20], torch.bfloat16)
    q = torch.randn(1, 4, 16).to(DEVICE, torch.bfloat16)
    lens = torch.tensor([20], dtype=torch.int32, device=DEVICE)
    plain = paged_decode_attention_triton(q, key_cache, value_cache, tables, lens, 0.25)
    scaled = paged_decode_attention_triton(q, key_cache, value_cache, tables, lens, 0.25, k_scale=3.0, v_scale=0.5)
    assert torch.equal(plain, scaled)
    key = torch.randn(3, 2, 16).to(DEVICE, torch.bfloat16)
    written = key_cache.clone()
    reshape_and_cache_triton(key, key, written, written.clone(), torch.tensor([0, 5, 9], device=DEVICE), k_scale=3.0, v_scale=0.5)
    assert torch.equal(written.view(-1, 2, 16)[[0, 5, 9]], key)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_fp8(block_size, heads, kv_heads, dtype) -> None:
    lengths = [1, 7, 33, 70]
    dim = 16
    key_cache, value_cache, tables = paged_setup(block_size, kv_heads, dim, lengths, torch.float32, seed=6)
    key8, value8, key_deq, value_deq = fp8_caches(key_cache, value_cache, dtype)
    q = torch.randn(len(lengths), heads, dim).to(DEVICE, dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    k_scale, v_scale = FP8_SCALES
    expected = paged_decode_attention_ref(q, key_deq, value_deq, tables, lens, dim**-0.5)
    reference = paged_decode_attention_ref(q, key8, value8, tables, lens, dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    got = paged_decode_attention_triton(q, key8, value8, tables, lens, dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    torch.testing.assert_close(reference, expected, atol=0, rtol=0)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("block_size", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_fp8(block_size, dtype) -> None:
    shapes = [(5, 5), (6, 20), (1, 9), (40, 45)]
    heads, kv_heads, dim = 4, 2, 16
    key_cache, value_cache, tables = paged_setup(block_size, kv_heads, dim, [c for _, c in shapes], torch.float32, seed=7)
    key8, value8, key_deq, value_deq = fp8_caches(key_cache, value_cache, dtype)
    q, query_start, lens = prefill_batch(shapes, heads, dim, dtype)
    k_scale, v_scale = FP8_SCALES
    expected = prefill_attention_ref(q, key_deq, value_deq, tables, query_start, lens, dim**-0.5)
    reference = prefill_attention_ref(q, key8, value8, tables, query_start, lens, dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    got = prefill_attention_triton(q, key8, value8, tables, query_start, lens, dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    torch.testing.assert_close(reference, expected, atol=0, rtol=0)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


# The CPU paths the engine runs: the references' very results, bit for bit


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1), (9, 3)])
@pytest.mark.parametrize(
    "lengths", [[1, 7, 33, 70], [16], [21], [32, 3, 17], [9, 9]], ids=["mixed", "one-full-block", "one", "block-edges", "equal"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_blocks_is_the_reference(block_size, heads, kv_heads, lengths, dtype) -> None:
    """Gathered by block, through shuffled (non-contiguous) tables, NaN in every unwritten slot
    (the tails of last blocks included), from separate pools and from one [2, ...] pair."""
    key_cache, value_cache, tables = paged_setup(block_size, kv_heads, 16, lengths, dtype)
    key_cache, value_cache, tables = key_cache.cpu(), value_cache.cpu(), tables.cpu()
    q = torch.randn(len(lengths), heads, 16).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    expected = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, 0.25)
    plan = decode_block_plan(tables, lens, block_size)
    pair = torch.stack([key_cache, value_cache])
    additive = decode_block_plan(tables, lens, block_size, mask_dtype=dtype)
    rows = decode_block_plan(tables, lens, block_size, mask_dtype=dtype, num_blocks=pair.shape[1])
    got = paged_decode_attention_blocks(q, key_cache, value_cache, plan, 0.25)
    paired = paged_decode_attention_blocks(q, pair[0], pair[1], additive, 0.25, kv_pair=pair)
    by_rows = paged_decode_attention_blocks(q, pair[0], pair[1], rows, 0.25, kv_pair=pair)
    assert rows.pair_rows.tolist() == plan.blocks.tolist() + (plan.blocks + pair.shape[1]).tolist()
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected) and torch.equal(paired, expected) and torch.equal(by_rows, expected)


def test_decode_block_plan_reads_only_each_context() -> None:
    """Blocks past a context's last are the null block, even where the table holds more; the tails
    zeroed are the unwritten slots of each last block below the longest context."""
    tables = torch.tensor([[5, 9, 2, 8], [7, 4, 6, 3], [1, 2, 3, 4]], dtype=torch.int32)
    plan = decode_block_plan(tables, torch.tensor([5, 9, 7], dtype=torch.int32), 4)
    assert plan.blocks.tolist() == [5, 9, 0, 7, 4, 6, 1, 2, 0]
    assert plan.tail.tolist() == [5, 6, 7, 2 * 12 + 7]
    assert plan.visible.shape == (3, 1, 1, 9) and plan.visible[:, 0, 0].sum(-1).tolist() == [5, 9, 7]
    assert decode_block_plan(tables[:2], torch.tensor([9, 9], dtype=torch.int32), 4).visible is None, "nothing to mask"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_blocks_fp8_is_the_reference(dtype) -> None:
    lengths = [1, 7, 33, 70]
    key_cache, value_cache, tables = paged_setup(8, 2, 16, lengths, torch.float32, seed=6)
    key8, value8, _, _ = fp8_caches(key_cache.cpu(), value_cache.cpu(), dtype)
    q = torch.randn(len(lengths), 4, 16).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    k_scale, v_scale = FP8_SCALES
    expected = paged_decode_attention_ref(q, key8, value8, tables.cpu(), lens, 0.25, k_scale=k_scale, v_scale=v_scale)
    plan = decode_block_plan(tables.cpu(), lens, 8)
    got = paged_decode_attention_blocks(q, key8, value8, plan, 0.25, k_scale=k_scale, v_scale=v_scale)
    assert torch.isfinite(got).all() and torch.equal(got, expected)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_cpu_is_the_reference(heads, kv_heads, dtype) -> None:
    """Whole prompts attend to their own new keys and values, chunks after a cached context to
    the cache: both give the reference's results."""
    shapes = [(5, 5), (6, 20), (1, 9), (40, 40), (3, 45)]
    key_cache, value_cache, tables = paged_setup(16, kv_heads, 16, [c for _, c in shapes], dtype, seed=2)
    key_cache, value_cache, tables = key_cache.cpu(), value_cache.cpu(), tables.cpu()
    q, query_start, lens = (t.cpu() for t in prefill_batch(shapes, heads, 16, dtype))
    starts = query_start.tolist()
    spans = tuple((starts[s], starts[s + 1], c) for s, (_, c) in enumerate(shapes))
    slots = torch.cat(
        [torch.tensor([int(tables[s, p // 16]) * 16 + p % 16 for p in range(c - new, c)]) for s, (new, c) in enumerate(shapes)]
    )
    key, value = key_cache.view(-1, kv_heads, 16)[slots], value_cache.view(-1, kv_heads, 16)[slots]  # as the step wrote them
    expected = prefill_attention_ref(q, key_cache, value_cache, tables, query_start, lens, 0.25)
    got = prefill_attention_cpu(q, key, value, key_cache, value_cache, tables, spans, 0.25)
    assert torch.isfinite(got).all() and torch.equal(got, expected)
