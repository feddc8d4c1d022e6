"""GGUF (ggml) quantization blocks dequantized with torch ops, on whatever device the bytes are on.

The gguf package's `gguf.quants.dequantize` is numpy on the CPU and takes seconds for a small
model; here each format is a handful of whole-tensor byte operations (views as float16/int8,
shifts and masks), a few passes over memory, on the CPU or on CUDA. Results equal the gguf
package's bit for bit: every product and sum is taken in float32 in the same order as its reference.

A row of a GGUF tensor is a run of whole blocks; each block holds `block_size` values in
`block_bytes` bytes, and all fields are little-endian. Values are indexed 0..block_size-1 within
their block below. The "legacy" formats hold 32 values per block with one float16 scale `d` (and,
for the `_1` variants, a float16 offset `m`); the K formats hold 256 values in a super-block of
sub-blocks whose scales are quantized against float16 super-scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
"""The ggml type ids (`gguf.GGMLQuantizationType`) this module decodes."""
QK = 32
QK_K = 256


def _half(fields: torch.Tensor) -> torch.Tensor:
    """[..., 2k] bytes -> [..., k] float32: each pair of bytes is a little-endian float16."""
    return fields.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n] uint8: every byte's low nibble, then every byte's high nibble."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _shifts(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 8n] uint8 of 0/1: bit j of the little-endian bit string `qh`."""
    return ((qh.unsqueeze(-1) >> _shifts(tuple(range(8)), qh)) & 1).flatten(-2)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    """F32: one value in 4 bytes, IEEE single precision."""
    return blocks.contiguous().view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    """F16: one value in 2 bytes, IEEE half precision, widened exactly."""
    return _half(blocks)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    """BF16: one value in 2 bytes, the upper half of a float32 (widened exactly, low half zero)."""
    return blocks.contiguous().view(torch.bfloat16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes per 32 values: d (f16) at bytes 0-1, then 32 int8 quants q; x = q * d."""
    return blocks[..., 2:].view(torch.int8) * _half(blocks[..., :2])


def _q4(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes of 4-bit quants -> 32 uint8: value j < 16 is byte j's low nibble, value j + 16 its high one."""
    return _nibbles(qs).flatten(-2)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """4 bytes of high bits and 16 of low nibbles -> 32 uint8: value j is nibble j plus 16 x bit j of qh."""
    return _q4(qs) | (_bits(qh) << 4)


def _centred(q: torch.Tensor, offset: int) -> torch.Tensor:
    """Unsigned quants below 128 -> int8 q - offset."""
    return q.view(torch.int8) - offset


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes per 32 values: d (f16) at bytes 0-1, then 16 bytes of nibbles q; x = (q - 8) * d."""
    return _centred(_q4(blocks[..., 2:]), 8) * _half(blocks[..., :2])


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 bytes per 32 values: d (f16) at 0-1, m (f16) at 2-3, then 16 bytes of nibbles q; x = q * d + m."""
    return (_q4(blocks[..., 4:]) * _half(blocks[..., :2])).add_(_half(blocks[..., 2:4]))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22 bytes per 32 values: d (f16) at 0-1, the 32 fifth bits at 2-5, nibbles at 6-21; x = (q - 16) * d."""
    return _centred(_q5(blocks[..., 2:6], blocks[..., 6:]), 16) * _half(blocks[..., :2])


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1, 24 bytes per 32 values: d and m (f16) at 0-3, the fifth bits at 4-7, nibbles at 8-23; x = q * d + m."""
    q = _q5(blocks[..., 4:8], blocks[..., 8:])
    return (q * _half(blocks[..., :2])).add_(_half(blocks[..., 2:4]))


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> the 6-bit scale and 6-bit min of each of the 8 sub-blocks (float32 [..., 8] each).

    Bytes 0-3 hold the scales of sub-blocks 0-3 in their low 6 bits, bytes 4-7 the mins of 0-3 the
    same way. Sub-block 4 + j takes its low 4 bits from byte 8 + j (scale: low nibble, min: high
    nibble) and its top 2 bits from the spare top bits of byte j (scale) or byte 4 + j (min).
    """
    scales, mins, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat((scales & 0x3F, (rest & 0x0F) | ((scales >> 6) << 4)), dim=-1)
    mn = torch.cat((mins & 0x3F, (rest >> 4) | ((mins >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K bytes 0-15 -> each sub-block's scale d * sc and offset dmin * mn, float32 [..., 8, 1]."""
    d, dmin = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])
    sc, mn = _scale_min_k4(blocks[..., 4:16])
    return (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [..., 8, 32] uint8: sub-block 2i is the low nibbles of bytes 32i..32i+31, 2i + 1 their high ones."""
    return _nibbles(qs.unflatten(-1, (4, 32))).flatten(-3, -2)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144 bytes per 256 values in 8 sub-blocks of 32.

    d and dmin (f16) at bytes 0-1 and 2-3; the sub-blocks' 6-bit scales sc and mins mn packed in
    bytes 4-15 (see `_scale_min_k4`); 4-bit quants q in bytes 16-143 (see `_k_nibbles`).
    Value l of sub-block s: x = (d * sc[s]) * q - dmin * mn[s].
    """
    scale, offset = _k_scales(blocks)
    return (_k_nibbles(blocks[..., 16:]) * scale).sub_(offset).flatten(-2)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K, 176 bytes per 256 values: Q4_K's fields with 32 bytes of fifth bits inserted at 16-47.

    Quant nibbles at bytes 48-175 as in Q4_K; value l of sub-block s takes bit s of byte 16 + l as
    its fifth bit (worth 16). x = (d * sc[s]) * q - dmin * mn[s].
    """
    scale, offset = _k_scales(blocks)
    high = (blocks[..., 16:48].unsqueeze(-2) >> _shifts(tuple(range(8)), blocks).unsqueeze(-1)) & 1
    q = _k_nibbles(blocks[..., 48:]) | (high << 4)
    return (q * scale).sub_(offset).flatten(-2)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210 bytes per 256 values in 16 sub-blocks of 16.

    Low nibbles ql at bytes 0-127, 2-bit high parts qh at 128-191, 16 int8 scales at 192-207, the
    f16 super-scale d at 208-209. The values fall in two halves of 128; in half h, value 64k + p
    (k in 0-1, p in 0-63) has nibble k of ql byte 64h + p, and value 32s + l (s in 0-3) has bits
    2s..2s+1 of qh byte 32h + l as its top two bits. q is the 6-bit number minus 32;
    value l of sub-block t: x = (d * scale[t]) * q.
    """
    low = _nibbles(blocks[..., :128].unflatten(-1, (2, 64))).flatten(-3)
    qh = blocks[..., 128:192].unflatten(-1, (2, 1, 32)) >> _shifts((0, 2, 4, 6), blocks).unsqueeze(-1)
    q = _centred(low | ((qh & 3).flatten(-3) << 4), 32)
    scale = blocks[..., 192:208].view(torch.int8) * _half(blocks[..., 208:210])
    return (q.unflatten(-1, (16, 16)) * scale.unsqueeze(-1)).flatten(-2)


@dataclass(frozen=True)
class BlockFormat:
    block_size: int
    """Values per block."""
    block_bytes: int
    decode: Callable[[torch.Tensor], torch.Tensor]
    """uint8 [..., n_blocks, block_bytes] -> float32 [..., n_blocks, block_size]."""


FORMATS: dict[int, BlockFormat] = {
    F32: BlockFormat(1, 4, _f32),
    F16: BlockFormat(1, 2, _f16),
    BF16: BlockFormat(1, 2, _bf16),
    Q8_0: BlockFormat(QK, 34, _q8_0),
    Q4_0: BlockFormat(QK, 18, _q4_0),
    Q4_1: BlockFormat(QK, 20, _q4_1),
    Q5_0: BlockFormat(QK, 22, _q5_0),
    Q5_1: BlockFormat(QK, 24, _q5_1),
    Q4_K: BlockFormat(QK_K, 144, _q4_k),
    Q5_K: BlockFormat(QK_K, 176, _q5_k),
    Q6_K: BlockFormat(QK_K, 210, _q6_k),
}


def supported(qtype: int) -> bool:
    """Whether `dequantize` decodes this ggml type (the others stay with the gguf package)."""
    return int(qtype) in FORMATS


def dequantize(raw: torch.Tensor, qtype: int, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [..., n_blocks * block_bytes] of whole blocks -> float32 [..., n_blocks * block_size].

    Runs where `raw` is, or on `device` (the bytes are moved there first, so only they cross).
    """
    fmt = FORMATS.get(int(qtype))
    if fmt is None:
        raise ValueError(f"ggml type {int(qtype)} has no torch dequantization; supported: {sorted(FORMATS)}")
    if raw.dtype != torch.uint8 or raw.dim() == 0 or raw.shape[-1] % fmt.block_bytes:
        raise ValueError(
            f"expected uint8 bytes whose last dimension is a multiple of {fmt.block_bytes} (whole blocks of "
            f"type {int(qtype)}); got {raw.dtype} of shape {tuple(raw.shape)}"
        )
    if device is not None:
        raw = raw.to(device)
    blocks = raw.unflatten(-1, (-1, fmt.block_bytes))
    return fmt.decode(blocks).flatten(-2)
