"""CPU linear layers with their weight packed once for oneDNN.

    y = x W^T (+ b),   x [..., K], W [N, K]

`F.linear` on CPU hands a float32 product to MKL's sgemm, which lays the weight out again on
every call: for the short activations of decoding (a few to a few hundred rows) that repacking
is a second pass over the weight, and the product runs at about 120 GFLOP/s on this machine's two
cores. oneDNN can keep the weight in its own blocked layout (`pack`, once after loading), and its
product then reaches 150 - 200 GFLOP/s at 8 - 64 rows and beats sgemm at every row count we
measured (1 - 2048). The sums are the same terms in another order: results agree to float32
rounding, not bit for bit.

Each call costs oneDNN about 15 - 20 us more than MKL's, so a small weight is faster left to
`F.linear` (a 576 x 576 float32 weight is the break-even at one row): `worth_packing` says which.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_ELEMENTS = 1 << 19
"""Weights with fewer elements stay with `F.linear`: oneDNN's per-call cost outweighs what it saves."""
PACKED_ATTR = "packed_weight"
"""The attribute of a layer that holds its packed weight (a plain attribute, not a parameter)."""
DTYPES = (torch.float32,)
"""Where packing has been measured faster (bfloat16 products already go through oneDNN)."""


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's packed linear, and it agrees with `F.linear` here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(48, 32), torch.randn(5, 32)
        return torch.allclose(linear(x, pack(w)), F.linear(x, w), rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError):  # an op this build lacks
        return False


def worth_packing(weight: torch.Tensor, min_elements: int = MIN_ELEMENTS) -> bool:
    return weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2 and weight.numel() >= min_elements


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` [N, K] in oneDNN's layout (an mkldnn tensor), for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) with W as `pack` left it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def module_linear(
    module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x W^T (+ bias) through the module's packed copy of `weight` where it has one
    (`PACKED_ATTR`, set by `workers.packed_weights`), else `F.linear`."""
    packed = module.__dict__.get(PACKED_ATTR)
    return F.linear(x, weight, bias) if packed is None else linear(x, packed, bias)


def packed_bytes(packed: torch.Tensor) -> int:
    """Host bytes a packed weight takes (its logical size: oneDNN's padding aside)."""
    return packed.numel() * packed.element_size()
