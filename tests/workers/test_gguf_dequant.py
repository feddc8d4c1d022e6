"""Torch dequantization of GGUF blocks against the gguf package's numpy reference.

Tolerance: none. Both sides decode the same integers and scales and take the same float32
products and sums in the same order (separate, correctly rounded operations, no fused
multiply-add), so the values must be equal bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers import gguf_dequant as gd
from workers.gguf_file import GGUFSource, GGUFTensorInfo
from workers.read_stats import ReadStats

HALF_FIELDS = {
    gd.Q8_0: (0,),
    gd.Q4_0: (0,),
    gd.Q4_1: (0, 2),
    gd.Q5_0: (0,),
    gd.Q5_1: (0, 2),
    gd.Q4_K: (0, 2),
    gd.Q5_K: (0, 2),
    gd.Q6_K: (208,),
    10: (80, 82),  # Q2_K, left to the gguf package: d and dmin follow 16 + 64 bytes of scales and quants
}
"""Byte offsets of each block's float16 fields (scales, mins), made finite in random blocks."""
FLOATS = {gd.F32: np.float32, gd.F16: np.float16}
QUANTIZABLE = (gd.BF16, gd.Q8_0, gd.Q4_0, gd.Q4_1, gd.Q5_0, gd.Q5_1)
"""The types gguf.quants.quantize writes."""
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]


def _name(qtype: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(qtype).name


def _sizes(qtype: int) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]


def float_bytes(qtype: int, values: np.ndarray) -> np.ndarray:
    """float32 values -> their F32, F16 or BF16 bytes (BF16: the upper half of each float32)."""
    if qtype == gd.BF16:
        return values.view(np.uint16)[:, 1::2].copy().view(np.uint8)
    return values.astype(FLOATS[qtype]).view(np.uint8)


def random_blocks(qtype: int, rows: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, n_blocks * block_bytes]: random bytes with finite float16 scale fields, or random floats."""
    rng = np.random.default_rng(seed)
    if qtype in (gd.F32, gd.F16, gd.BF16):
        return float_bytes(qtype, rng.standard_normal((rows, n_blocks), dtype=np.float32))
    _, block_bytes = _sizes(qtype)
    blocks = rng.integers(0, 256, (rows, n_blocks, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        scales = (rng.standard_normal((rows, n_blocks, 1)) * 0.05).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: int) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", sorted(gd.FORMATS), ids=_name)
def test_random_blocks_equal_gguf_reference(qtype: int, device: str) -> None:
    raw = random_blocks(qtype, 3, 40 if gd.FORMATS[qtype].block_size == 1 else 5)
    expected = reference(raw, qtype)
    got = gd.dequantize(torch.from_numpy(raw), qtype, device=device)
    assert got.dtype == torch.float32 and got.device.type == device
    assert torch.isfinite(expected).all()
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=_name)
def test_quantized_weights_equal_gguf_reference(qtype: int) -> None:
    import gguf

    block, _ = _sizes(qtype)
    weights = np.random.default_rng(2).standard_normal((4, 8 * block), dtype=np.float32) * 0.1
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType(qtype))
    got = gd.dequantize(torch.from_numpy(raw), qtype)
    assert torch.equal(got, reference(raw, qtype))
    assert torch.allclose(got, torch.from_numpy(weights), atol=0.1)


@pytest.mark.parametrize("qtype", sorted(gd.FORMATS), ids=_name)
def test_block_sizes_match_gguf(qtype: int) -> None:
    fmt = gd.FORMATS[qtype]
    assert (fmt.block_size, fmt.block_bytes) == _sizes(qtype)


def test_unsupported_types_and_bad_shapes_are_refused() -> None:
    assert not gd.supported(10) and gd.supported(gd.Q4_K)
    with pytest.raises(ValueError, match="no torch dequantization"):
        gd.dequantize(torch.zeros(2, 84, dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match="multiple of 20"):
        gd.dequantize(torch.zeros(2, 30, dtype=torch.uint8), gd.Q4_1)


def _source(qtype: int, shape: tuple[int, ...]) -> tuple[GGUFSource, torch.Tensor]:
    """A GGUF tensor of random blocks at an odd offset in its file's bytes, and its reference values."""
    block, _ = _sizes(qtype)
    raw = random_blocks(qtype, int(np.prod(shape[:-1])), shape[-1] // block, seed=3)
    data = np.concatenate([np.zeros(7, dtype=np.uint8), raw.reshape(-1)])
    info = GGUFTensorInfo("blk.0.ffn_up.weight", shape, qtype, 7, raw.size, raw.shape[1])
    source = GGUFSource("model.layers.0.mlp.up_proj.weight", "f.gguf", shape, info, data, ReadStats())
    return source, reference(raw, qtype).reshape(shape)


SLICES = [(slice(None), slice(None)), (slice(1, 3), slice(37, 300)), (slice(2, 3), slice(0, 5))]


@pytest.mark.parametrize("qtype", [*sorted(gd.FORMATS), 10], ids=_name)
@pytest.mark.parametrize("index", SLICES)
def test_source_slices_equal_whole_tensor(qtype: int, index: tuple[slice, slice]) -> None:
    source, whole = _source(qtype, (4, 512))
    got = source.read(index)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, whole[index])
    assert 0 < source._stats.bytes_read <= source._info.n_bytes


def test_source_reads_a_vector_slice() -> None:
    source, whole = _source(gd.F32, (64,))
    assert torch.equal(source.read((slice(10, 20),)), whole[10:20])
