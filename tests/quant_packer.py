"""A small GPTQ and AWQ packer for the tests: quantizes a float model's linear layers to 4 bits and
writes them in the layouts AutoGPTQ and AutoAWQ save, following their documented bit layouts
(independently of shardlm's loader, which reads them back).

- Quantization (both): per group of input rows and per output channel, scale = (max - min) / 15
  over the group (GPTQ includes 0 in [min, max]; symmetric GPTQ uses [-a, a] with zero 8),
  zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15).
- GPTQ: qweight [K/8, N] int32, nibble i (bits 4i..4i+3) of word [r, n] = q[8r + i, n];
  qzeros [G, N/8] int32, nibble i of word [g, c] = zero[g, 8c + i] - 1; scales [G, N] float16;
  g_idx [K] int32, the group of each input row (act-order: rows quantized in a permuted order,
  group = position in that order // group_size).
- AWQ (GEMM): qweight [K, N/8] and qzeros [G, N/8], nibble i of word c = value of column
  8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; zeros stored as is; scales [G, N] float16; no g_idx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)
SAME_INPUT = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 1, "up_proj": 1, "o_proj": 2, "down_proj": 3}
"""Layers that read the same input get the same act-order (GPTQ orders rows by the input's Hessian)."""


def act_order_generator(module: str, seed: int = 0) -> torch.Generator:
    """The generator of `module`'s act-order permutation: shared by projections of the same input."""
    return torch.Generator().manual_seed(seed * 10 + SAME_INPUT[module])


@dataclass(frozen=True)
class Scheme:
    method: str  # "gptq" or "awq"
    group_size: int = 128  # -1: per output channel
    sym: bool = True
    desc_act: bool = False

    def quantization_config(self) -> dict[str, Any]:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True, "version": "gemm"}
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "damp_percent": 0.01,
            "static_groups": False,
            "true_sequential": True,
        }


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack(values: torch.Tensor, dim: int, nibble_order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Pack 4-bit `values` eight to an int32 along `dim`: nibble i of a word holds element
    8c + nibble_order[i] of that dimension."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, element in enumerate(nibble_order):
        words |= (v[..., element] & 0xF) << (4 * i)
    return _to_int32(words).movedim(-1, dim).contiguous()


def quantize(w: torch.Tensor, scheme: Scheme, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """w [N, K] float -> q [K, N], zeros [G, N], scales [G, N] (float16), g_idx [K], dequantized [N, K]."""
    n, k = w.shape
    size = k if scheme.group_size == -1 else scheme.group_size
    order = torch.randperm(k, generator=generator) if scheme.desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // size).to(torch.int32)
    groups = -(-k // size)
    wt = w.t().float()  # [K, N]
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        rows = wt[g_idx == g]
        lo, hi = rows.min(0).values, rows.max(0).values
        if scheme.method == "gptq":
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            if scheme.sym:
                hi = torch.maximum(hi, -lo)
                lo = -hi
        scale = ((hi - lo) / 15).clamp(min=1e-5).half().float()
        if scheme.method == "gptq" and scheme.sym:
            zero = torch.full_like(lo, 8, dtype=torch.int64)
        else:  # AutoGPTQ's format stores zero - 1, so its zeros start at 1
            zero = (-lo / scale).round().clamp(1 if scheme.method == "gptq" else 0, 15).long()
        scales[g], zeros[g] = scale, zero
    q = ((wt / scales[g_idx.long()]).round() + zeros[g_idx.long()]).clamp(0, 15).long()
    dequantized = ((q - zeros[g_idx.long()]) * scales[g_idx.long()]).t().contiguous()
    return dict(q=q, zeros=zeros, scales=scales.half(), g_idx=g_idx, dequantized=dequantized)


def pack(quantized: dict[str, torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors AutoGPTQ / AutoAWQ save for one linear layer."""
    q, zeros, scales = quantized["q"], quantized["zeros"], quantized["scales"]
    if scheme.method == "awq":
        return dict(qweight=_pack(q, 1, AWQ_NIBBLE_COLUMNS), qzeros=_pack(zeros, 1, AWQ_NIBBLE_COLUMNS), scales=scales)
    return dict(qweight=_pack(q, 0), qzeros=_pack(zeros - 1, 1), scales=scales, g_idx=quantized["g_idx"])


def write_quantized_checkpoint(model: Any, folder: Path, scheme: Scheme, seed: int = 0) -> Any:
    """Quantize every decoder linear layer of the transformers `model`, save the 4-bit checkpoint
    in `folder`, and load the dequantized weights back into `model` (the reference); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    state, tensors = model.state_dict(), {}
    for name, value in state.items():
        module = name.rsplit(".", 2)
        if name.endswith(".weight") and len(module) == 3 and module[1] in LINEARS:
            quantized = quantize(value, scheme, act_order_generator(module[1], seed))
            prefix = name[: -len(".weight")]
            tensors.update({f"{prefix}.{key}": t for key, t in pack(quantized, scheme).items()})
            with torch.no_grad():
                model.get_parameter(name).copy_(quantized["dequantized"])
        elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            tensors[name] = value.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = scheme.quantization_config()
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return model
