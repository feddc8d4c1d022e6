"""Pieces the quantized kernels share: the float8 e4m3fn codec, per-row scales, and the tiling of
the weight-only linear kernels.

float8 e4m3fn: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities, code 0x7F/0xFF is
NaN. Normal codes are 2^(e-7) (1 + m/8) for e in 1..15, subnormal ones m 2^-9; the largest finite
value is 448. Rounding to nearest even keeps |x - fp8(x)| <= 2^-4 |x| for normal values and
<= 2^-10 for subnormal ones.

The Triton kernels never name Triton's own float8 type: they read and write the codes as uint8
and convert with the bit operations below. That works on every GPU (Triton refuses its e4m3 type
before compute capability 8.9) and under TRITON_INTERPRET=1, whose float32 -> float8 cast rounds
wrongly where the mantissa carries into the exponent (7.95 becomes 4, not 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import exact_dots

FP8_MAX = 448.0
"""The largest finite float8 e4m3fn value."""

FP8 = torch.float8_e4m3fn


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8


def row_scales(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric scales amax / qmax in float32; an all-zero row gets scale 1 (never 0 or NaN)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8 e4m3fn (torch's own cast does not promise to saturate)."""
    return t.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_fp8(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 codes -> float32 x scale -> dtype; any other tensor is returned as it is."""
    if not is_fp8(t):
        return t
    return (t.float() * scale).to(dtype)


def quantize_fp8(t: torch.Tensor, scale: float) -> torch.Tensor:
    """clamp(t x (1 / scale), +-448) -> float8 e4m3fn (rounded to nearest even)."""
    return to_fp8(t.float() * (1.0 / scale))


@triton.jit
def e4m3_decode(code):
    """float16 values of float8 e4m3fn codes (uint8), exact. The code's bits placed as a float16
    (sign at bit 15, exponent at bits 10-13, mantissa at bits 7-9) are the value x 2^-8, for
    subnormal codes too; 0x7F/0xFF decode to NaN."""
    bits = code.to(tl.uint16)
    half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True)
    value = half * 256.0
    return tl.where((bits & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def e4m3_encode(x):
    """float8 e4m3fn codes (uint8) of float32 x: saturated to +-448, rounded to nearest even.

    |x| >= 2^-6 (normal): round the float32 mantissa to 3 bits (the carry may step into the
    exponent), then re-bias the exponent from 127 to 7. |x| < 2^-6 (subnormal, multiples of 2^-9):
    in 2^14 + |x| the float32 unit is 2^-9, so the add rounds and the low bits count the units.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    sign = (x.to(tl.uint32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    bits = a.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    subnormal = (a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    code = tl.where(a < 0.015625, subnormal, normal)
    return (code | sign).to(tl.uint8)


def linear_blocks(m: int, n: int, x_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages) for a weight-only linear kernel with m activation
    rows of x_bytes-wide elements and n outputs (from a sweep on an H200 at M = 1 and 64, N x K =
    4096 x 4096, 4096 x 14336 and 14336 x 4096).

    Decode (small m) reads each weight once and is bound by memory: N tiles of 32 make enough
    programs to keep every multiprocessor loading unless N is large, and long K tiles keep more
    bytes in flight per program, as far as four stages of activation tiles fit in shared memory.
    """
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if n >= 8192 else 32
    block_k = 128 if (block_m == 64 and block_n == 64) or (block_m > 16 and x_bytes > 2) else 256
    return block_m, block_n, block_k, 4


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a contiguous [M, K] matrix."""
    assert x.shape[-1] == k, f"activations end in {x.shape[-1]}, the weight takes {k}"
    return x.reshape(-1, k).contiguous()


def scaled_weight_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The torch path for one-byte weights with a scale per output: widen, multiply, scale the
    outputs (cheaper than scaling the weight), add the bias."""
    y = F.linear(x, weight.to(x.dtype)) * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


@triton.jit
def scaled_weight_linear_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    DECODE_E4M3: tl.constexpr,
):
    """y = (x W8^T) s + b for one-byte weights W8 [N, K] with a scale per output: int8 or float8
    tiles converted to x's dtype (exact for both), or with DECODE_E4M3 float8 codes held as uint8
    and decoded with bit operations (GPUs before compute capability 8.9); float32 accumulation."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # the [BLOCK_K, BLOCK_N] tile of W^T
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * K + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DECODE_E4M3:
            w = e4m3_decode(w)
        if IEEE:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    y = acc * tl.load(scale_ptr + n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + m[:, None].to(tl.int64) * N + n[None, :], y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :]
    )


def scaled_weight_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, decode_e4m3: bool = False
) -> torch.Tensor:
    """Launch `scaled_weight_linear_kernel` on x [..., K] (the callers check the operands)."""
    n, k = weight.shape
    x2 = as_rows(x, k)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], n)
    block_m, block_n, block_k, stages = linear_blocks(x2.shape[0], n, x2.element_size())
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
    scaled_weight_linear_kernel[grid](
        x2,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        x2.shape[0],
        n,
        k,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=exact_dots(x2),
        DECODE_E4M3=decode_e4m3,
        num_stages=stages,
    )
    return out.view(*x.shape[:-1], n)
