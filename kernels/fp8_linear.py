"""Linear layer with float8 e4m3fn weights and one float32 scale per output channel.

    y[m, n] = (sum_k x[m, k] W8[n, k]) s[n] + b[n],   W[n, k] ~ W8[n, k] s[n]

Layouts: x [..., K]; weight [N, K] float8_e4m3fn (row n is output channel n); scale [N] float32;
bias [N] or None; y [..., N] in x's dtype.

Three ways to compute it, chosen by `fp8_linear`:
- CPU: `fp8_linear_ref`, the maths in torch.
- CUDA from compute capability 8.9 with bfloat16 activations: `fp8_linear_scaled_mm`, which also
  quantizes each activation row to float8 with its own scale and runs the float8 matrix units
  through torch._scaled_mm (row-wise scaling takes bfloat16 output on every torch that has it).
- Any other CUDA: `fp8_linear_triton`, weight-only (activations stay in their dtype).

On an H200 (kernels/bench.py) the weight-only Triton path beats _scaled_mm at M = 1 and 64: the
activation quantization costs several small torch kernels there, which a decode step feels. So
`fp8_linear` takes _scaled_mm only for more than SCALED_MM_MIN_ROWS rows (prompt chunks), where
the matrix units' work outweighs the quantization.
"""

from __future__ import annotations

import functools
import logging

import torch

from kernels.quant import FP8, FP8_MAX, as_rows, row_scales, scaled_weight_linear, scaled_weight_linear_ref, to_fp8

logger = logging.getLogger(f"shardlm.{__name__}")

__all__ = [
    "FP8_MAX",
    "quantize_fp8_rows",
    "fp8_linear",
    "fp8_linear_ref",
    "fp8_linear_scaled_mm",
    "fp8_linear_triton",
]

SCALED_MM_DTYPES = (torch.bfloat16,)
SCALED_MM_MIN_ROWS = 64
"""Up to this many rows (decode batches) the weight-only Triton kernel was faster on an H200."""
"""Output dtypes torch._scaled_mm's row-wise scaling takes everywhere (float16 and float32 came later)."""


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] float8_e4m3fn, scale [N] float32), scale[n] = max_k |w[n, k]| / 448,
    q = clamp(w / scale, +-448) rounded to nearest even. An all-zero row gets scale 1."""
    scale = row_scales(w.abs().amax(dim=1), FP8_MAX)
    return to_fp8(w.float() / scale[:, None]), scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return scaled_weight_linear_ref(x, weight, scale, bias)


def fp8_linear_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Activations quantized per row on the fly (x ~ x8 s_x), then y = (x8 W8^T) s_x s^T + b on the
    float8 matrix units. Needs K and N multiples of 16 and a bfloat16 x."""
    n, k = weight.shape
    x2 = as_rows(x, k)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    x8, x_scale = quantize_fp8_rows(x2)
    # weight.t() of a contiguous [N, K] is the column-major [K, N] operand _scaled_mm wants
    y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale[:, None], scale_b=scale[None, :], out_dtype=x.dtype)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)


def fp8_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *, native: bool | None = None
) -> torch.Tensor:
    """Weight-only: float8 weight tiles converted to x's dtype in the kernel, dot products
    accumulated in float32, then the per-column scale and the bias. `native` (default: where
    Triton has float8 e4m3, from compute capability 8.9 and under the interpreter) converts with
    the hardware; otherwise the kernel decodes the codes' bits (kernels.quant.e4m3_decode)."""
    n, k = weight.shape
    assert weight.dtype == FP8 and weight.is_contiguous(), "weight must be a contiguous float8_e4m3fn [N, K]"
    assert scale.dtype == torch.float32 and scale.shape == (n,), f"scale must be float32 [{n}]"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), f"bias must be [{n}]"
    if native is None:
        native = not x.is_cuda or _has_fp8_units(x.device.index or 0)
    return scaled_weight_linear(x, weight if native else weight.view(torch.uint8), scale, bias, decode_e4m3=not native)


@functools.cache
def _has_fp8_units(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not x.is_cuda:
        return fp8_linear_ref(x, weight, scale, bias)
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    device = x.device.index or 0
    if (
        rows > SCALED_MM_MIN_ROWS
        and x.dtype in SCALED_MM_DTYPES
        and n % 16 == 0
        and k % 16 == 0
        and _has_fp8_units(device)
        and device not in _SCALED_MM_REFUSED
    ):
        try:
            return fp8_linear_scaled_mm(x, weight, scale, bias)
        except RuntimeError as exc:  # row-wise scaling missing (sm89 before torch 2.7) or refused by cuBLAS
            _SCALED_MM_REFUSED.add(device)
            logger.warning(
                "torch._scaled_mm with row-wise scales failed on cuda:%d (%s); using the Triton fp8 kernel", device, exc
            )
    return fp8_linear_triton(x, weight, scale, bias)


_SCALED_MM_REFUSED: set[int] = set()
"""CUDA devices where _scaled_mm with row-wise scales failed once: they take the Triton kernel."""
