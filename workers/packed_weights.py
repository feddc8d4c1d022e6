"""A CPU rank's larger linear weights packed once for oneDNN after loading (`kernels.onednn_linear`).

Each packed layer keeps its parameter as it is (what sleep, sharded_state and the tests read) and
gains `packed_weight`, a copy in oneDNN's layout that its forward multiplies by instead: the
rank's memory grows by the packed bytes, which the load report shows. A model loaded again (wake
up after sleep level 2) is packed again; nothing writes a parameter after loading.
`SHARDLM_CPU_PACKED_LINEAR=0` leaves every layer to `F.linear`.
"""

from __future__ import annotations

import os

from torch import nn

from kernels import onednn_linear
from parallel.layers import ParallelLinear, ParallelLMHead
from parallel.quantization import Unquantized

PACK_ENV = "SHARDLM_CPU_PACKED_LINEAR"


def packing_wanted() -> bool:
    return os.environ.get(PACK_ENV, "1").strip() != "0" and onednn_linear.available()


def pack_linear_weights(model: nn.Module, min_elements: int = onednn_linear.MIN_ELEMENTS) -> int:
    """Give every unquantized CPU linear layer and LM head whose weight is worth it
    (`onednn_linear.worth_packing`) its packed copy; the bytes the copies take."""
    if not packing_wanted():
        return 0
    total = 0
    for module in model.modules():
        plain = isinstance(module, ParallelLMHead) or (
            isinstance(module, ParallelLinear) and isinstance(module.method, Unquantized)
        )
        if plain and onednn_linear.worth_packing(module.weight, min_elements):
            packed = onednn_linear.pack(module.weight)
            setattr(module, onednn_linear.PACKED_ATTR, packed)
            total += onednn_linear.packed_bytes(packed)
    return total


def unpack_linear_weights(model: nn.Module) -> None:
    """Every layer back to `F.linear` on its parameter (the packed copies freed)."""
    for module in model.modules():
        module.__dict__.pop(onednn_linear.PACKED_ATTR, None)
