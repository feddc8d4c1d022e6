"""The quantized linear kernels and the float8 codec against their torch references (on CPU under
TRITON_INTERPRET=1 at small sizes; on a GPU when there is one).

Errors are measured against the output's scale: max |got - expected| / max |expected|. Triton
against the reference: in float32 both sum the same products in another order, so 1e-5; in
bfloat16 the reference rounds the product before scaling it and the kernel rounds once at the
end, a few units of bfloat16's 2^-8, so 2e-2. The kernels run bfloat16 under the interpreter too:
there the dot products are widened to float32 (kernels.exact_dots).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.fp8_linear import (
    FP8_MAX,
    SCALED_MM_MIN_ROWS,
    fp8_linear,
    fp8_linear_ref,
    fp8_linear_scaled_mm,
    fp8_linear_triton,
    quantize_fp8_rows,
)
from kernels.int4_linear import (
    dequantize_int4,
    int4_linear,
    int4_linear_ref,
    int4_linear_triton,
    pack_int4_rows,
    unpack_int4_rows,
)
from kernels.int8_linear import int8_linear, int8_linear_ref, int8_linear_triton, quantize_int8_rows
from kernels.quant import FP8, e4m3_decode, e4m3_encode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 37, 70]
"""Activation rows: a decode step, and counts that are no multiple of any block."""


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


def layer(n: int, k: int, bias: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 weight [N, K] with rows of very different sizes, and maybe a bias (on DEVICE)."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]
    return w.to(DEVICE), (torch.randn(n).to(DEVICE) if bias else None)


# the float8 e4m3fn codec the Triton kernels use


@triton.jit
def _decode_kernel(codes_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, e4m3_decode(tl.load(codes_ptr + i)).to(tl.float32))


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(codes_ptr + i, e4m3_encode(tl.load(x_ptr + i)))


def test_e4m3_decode_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    out = torch.empty(256, device=DEVICE)
    _decode_kernel[(1,)](codes, out, 256)
    expected = codes.view(FP8).float()
    assert torch.equal(out.isnan(), expected.isnan()) and expected.isnan().sum() == 2
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


def test_e4m3_encode_matches_torch() -> None:
    """Random values at every scale, every code, every midpoint between neighbouring codes (ties
    go to the even code), and values past +-448 (saturated)."""
    torch.manual_seed(0)
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    values = values[values.isfinite()].unique()
    x = torch.cat(
        [
            torch.randn(1024) * torch.logspace(-4, 3, 1024),
            values,
            (values[1:] + values[:-1]) / 2,
            torch.tensor([500.0, -1e6, 449.0, -0.0, 2**-10, 3 * 2**-11]),
        ]
    )
    x = torch.cat([x, torch.zeros(4096 - x.numel())]).to(DEVICE)
    codes = torch.empty(4096, dtype=torch.uint8, device=DEVICE)
    _encode_kernel[(1,)](x, codes, 4096)
    assert torch.equal(codes, x.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8))


# fp8


def test_quantize_fp8_rows() -> None:
    """scale = amax / 448 per row, every element within float8's rounding (2^-4 relative, 2^-10 x
    scale among the subnormal codes), the largest element of each row at +-448, a zero row
    harmless."""
    w, _ = layer(24, 64, False, seed=1)
    w[5] = 0.0
    q, scale = quantize_fp8_rows(w.to(torch.bfloat16))
    w = w.to(torch.bfloat16).float()
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (24,)
    assert scale[5] == 1.0 and (q[5].float() == 0).all()
    torch.testing.assert_close(scale[w.abs().amax(1) > 0], (w.abs().amax(1) / FP8_MAX)[w.abs().amax(1) > 0])
    back = q.float() * scale[:, None]
    assert ((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale[:, None] * 1.0001).all()
    assert torch.equal(q.float().abs().amax(1)[w.abs().amax(1) > 0], torch.full((23,), FP8_MAX, device=DEVICE))


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_reference_is_the_float_maths(bias) -> None:
    w, b = layer(40, 96, bias, seed=2)
    q, scale = quantize_fp8_rows(w)
    x = torch.randn(5, 3, 96, device=DEVICE)
    expected = x.double() @ (q.double() * scale.double()[:, None]).T + (b.double() if bias else 0.0)
    got = fp8_linear_ref(x, q, scale, b)
    assert got.shape == (5, 3, 40) and relative_error(got, expected) < 1e-6


NATIVE_FP8 = [True] if DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9) else []


@pytest.mark.parametrize("native", NATIVE_FP8 + [False])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_linear_triton(m, dtype, native) -> None:
    """Both ways of reading float8 weights: Triton's own type, and the codes' bits."""
    w, b = layer(80, 96, m != 37, seed=3)  # N = 80 and K = 96: tails for every block size
    q, scale = quantize_fp8_rows(w)
    x = torch.randn(m, 96, device=DEVICE).to(dtype)
    b = b.to(dtype) if b is not None else None
    got = fp8_linear_triton(x, q, scale, b, native=native)
    assert got.dtype == dtype and relative_error(got, fp8_linear_ref(x, q, scale, b)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs float8 units")
@pytest.mark.parametrize("m", [1, 37, 300])
def test_fp8_linear_scaled_mm(m) -> None:
    """Activations quantized to float8 as well: each product's activation is within 2^-4 of its
    value (relative), so |y8 - y| <= 2^-4 sum_k |x_k w_k| elementwise, plus bfloat16 output rounding."""
    w, b = layer(256, 512, True, seed=4)
    q, scale = quantize_fp8_rows(w)
    x = torch.randn(m, 512, device=DEVICE).to(torch.bfloat16)
    b = b.to(torch.bfloat16)
    got = fp8_linear_scaled_mm(x, q, scale, b)
    chosen = got if m > SCALED_MM_MIN_ROWS else fp8_linear_triton(x, q, scale, b)
    assert torch.equal(fp8_linear(x, q, scale, b), chosen)
    expected = fp8_linear_ref(x, q, scale, b).float()
    bound = 2**-4 * (x.float().abs() @ (q.float() * scale[:, None]).abs().T) + 2**-6 * expected.abs() + 1e-3
    assert ((got.float() - expected).abs() <= bound).all()


# int8


def test_quantize_int8_rows() -> None:
    w, _ = layer(24, 64, False, seed=5)
    w[7] = 0.0
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale[7] == 1.0 and (q[7] == 0).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * 1.0001).all()
    assert torch.equal(q.abs().amax(1).cpu()[torch.arange(24) != 7], torch.full((23,), 127, dtype=torch.int8))


@pytest.mark.parametrize("bias", [False, True])
def test_int8_reference_is_the_float_maths(bias) -> None:
    w, b = layer(40, 96, bias, seed=6)
    q, scale = quantize_int8_rows(w)
    x = torch.randn(7, 96, device=DEVICE)
    expected = x.double() @ (q.double() * scale.double()[:, None]).T + (b.double() if bias else 0.0)
    assert relative_error(int8_linear_ref(x, q, scale, b), expected) < 1e-6


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_triton(m, dtype) -> None:
    w, b = layer(80, 96, m != 37, seed=7)
    q, scale = quantize_int8_rows(w)
    x = torch.randn(m, 96, device=DEVICE).to(dtype)
    b = b.to(dtype) if b is not None else None
    got = int8_linear_triton(x, q, scale, b)
    assert got.dtype == dtype and relative_error(got, int8_linear_ref(x, q, scale, b)) < TOL[dtype]


# int4 (GPTQ / AWQ after conversion)


def int4_layer(n: int, k: int, group: int, act_order: bool, scale_dtype: torch.dtype, seed: int):
    """(q [K, N] in 0..15, scales, zeros [G, N], g_idx [K]) on DEVICE; group = k means one group."""
    torch.manual_seed(seed)
    groups = k // group
    q = torch.randint(0, 16, (k, n))
    scales = (torch.rand(groups, n) * 0.02 + 0.005).to(scale_dtype)
    zeros = torch.randint(0, 16, (groups, n)).to(scale_dtype)
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    return q.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), g_idx.to(DEVICE, torch.int32)


def test_pack_int4_is_gptq_layout() -> None:
    """Nibble i of word r is row 8r + i, bit 31 included (a row-7 value >= 8 makes the word negative)."""
    values = torch.tensor([[1, 15], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0], [7, 0], [8, 9]])
    packed = pack_int4_rows(values.to(DEVICE))
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert int(packed[0, 0]) == 0x87654321 - 2**32 and int(packed[0, 1]) == 0x9000000F - 2**32
    q, _, _, _ = int4_layer(24, 64, 32, False, torch.float32, seed=8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(q)), q.int())


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_int4(act_order) -> None:
    q, scales, zeros, g_idx = int4_layer(16, 64, 16, act_order, torch.float16, seed=9)
    w = dequantize_int4(pack_int4_rows(q), scales, zeros, g_idx, torch.float32)
    assert w.shape == (16, 64)
    for k in range(64):
        g = int(g_idx[k])
        torch.testing.assert_close(w[:, k], (q[k].float() - zeros[g].float()) * scales[g].float(), atol=0, rtol=0)


@pytest.mark.parametrize("group,act_order", [(32, False), (32, True), (128, False), (128, True), (256, False)])
@pytest.mark.parametrize("m", [1, 37])
def test_int4_linear_triton(group, act_order, m) -> None:
    """Groups of 32 and 128, one group per channel (256 = K), with and without a shuffled g_idx."""
    n, k = 48, 256
    q, scales, zeros, g_idx = int4_layer(n, k, group, act_order, torch.float16, seed=10 + m)
    qweight = pack_int4_rows(q)
    bias = torch.randn(n, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE)
    got = int4_linear_triton(x, qweight, scales, zeros, g_idx, bias)
    assert relative_error(got, int4_linear_ref(x, qweight, scales, zeros, g_idx, bias)) < TOL[torch.float32]


@pytest.mark.parametrize("group", [32, 64, 256, 24])
@pytest.mark.parametrize("m", [1, 37])
def test_int4_linear_triton_grouped(group, m) -> None:
    """Contiguous groups (g_idx = k // group): each tile in one group, scaled once per output; a
    group of 24 rows fits no tile of 16 or more and takes the gathering kernel."""
    n, k = 40, 768 if group == 24 else 256
    q, scales, zeros, g_idx = int4_layer(n, k, group, False, torch.float16, seed=30 + m)
    qweight, bias = pack_int4_rows(q), torch.randn(n, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE)
    got = int4_linear_triton(x, qweight, scales, zeros, g_idx, bias, group_size=group)
    assert relative_error(got, int4_linear_ref(x, qweight, scales, zeros, g_idx, bias)) < TOL[torch.float32]
    if DEVICE == "cuda":
        xb, sb, zb = x.to(torch.bfloat16), scales.bfloat16(), zeros.bfloat16()
        got = int4_linear_triton(xb, qweight, sb, zb, g_idx, group_size=group)
        assert relative_error(got, int4_linear_ref(xb, qweight, sb, zb, g_idx)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 37])
def test_int4_linear_triton_bfloat16(m) -> None:
    n, k = 48, 256
    q, scales, zeros, g_idx = int4_layer(n, k, 128, True, torch.bfloat16, seed=20)
    qweight = pack_int4_rows(q)
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    got = int4_linear_triton(x, qweight, scales, zeros, g_idx)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, int4_linear_ref(x, qweight, scales, zeros, g_idx)) < TOL[torch.bfloat16]


def test_int4_reference_is_the_float_maths() -> None:
    q, scales, zeros, g_idx = int4_layer(24, 64, 32, True, torch.float32, seed=21)
    x = torch.randn(3, 64, device=DEVICE)
    groups = g_idx.long()
    w = (q.double() - zeros.double()[groups]) * scales.double()[groups]  # [K, N]
    got = int4_linear_ref(x, pack_int4_rows(q), scales, zeros, g_idx)
    assert relative_error(got, x.double() @ w) < 1e-6


# dispatch


def test_dispatch_and_empty_batches() -> None:
    """On CPU each entry point is its reference; every path returns [..., N] for zero rows."""
    w, b = layer(32, 64, True, seed=22)
    x = torch.randn(2, 4, 64, device=DEVICE)
    q8, s8 = quantize_fp8_rows(w)
    qi, si = quantize_int8_rows(w)
    q4, scales, zeros, g_idx = int4_layer(32, 64, 32, False, torch.float32, seed=23)
    packed = pack_int4_rows(q4)
    if DEVICE == "cpu":
        assert torch.equal(fp8_linear(x, q8, s8, b), fp8_linear_ref(x, q8, s8, b))
        assert torch.equal(int8_linear(x, qi, si, b), int8_linear_ref(x, qi, si, b))
        assert torch.equal(int4_linear(x, packed, scales, zeros, g_idx, b), int4_linear_ref(x, packed, scales, zeros, g_idx, b))
    else:  # float32 activations take the Triton paths everywhere
        assert torch.equal(fp8_linear(x, q8, s8, b), fp8_linear_triton(x, q8, s8, b))
        assert torch.equal(int8_linear(x, qi, si, b), int8_linear_triton(x, qi, si, b))
        assert torch.equal(
            int4_linear(x, packed, scales, zeros, g_idx, b), int4_linear_triton(x, packed, scales, zeros, g_idx, b)
        )
    empty = torch.randn(0, 64, device=DEVICE)
    assert fp8_linear_triton(empty, q8, s8, b).shape == (0, 32)
    assert int8_linear_triton(empty, qi, si, b).shape == (0, 32)
    assert int4_linear_triton(empty, packed, scales, zeros, g_idx, b).shape == (0, 32)
