"""The Llama-family decoder (Llama, Mistral, Qwen2), tensor-parallel.

One class serves the three families: they differ only in which projections carry a bias, which
`ModelArch` records. Per layer, attention and MLP each take one column-parallel layer in and one
row-parallel layer out, so each costs one all-reduce.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from parallel.errors import ConfigError
from parallel.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
)
from parallel.quantization import QuantConfig
from parallel.state import TensorParallelGroup
from workers.config import ModelArch
from workers.models.layers import Attention, AttentionMetadata, PagedMetadata, RMSNorm, RotaryEmbedding, apply_rotary_

Metadata = AttentionMetadata | PagedMetadata
Rope = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallelGroup, quant: QuantConfig | None) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.qkv_bias, tp, quant
        )
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.o_bias, tp, quant)
        self.attn = Attention(arch.head_dim**-0.5)

    def forward(self, rope: Rope, hidden: torch.Tensor, meta: Metadata) -> torch.Tensor:
        heads = self.qkv_proj.heads(self.qkv_proj.forward(hidden))  # [T, q heads + 2 kv heads, d]
        q_heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        apply_rotary_(heads.narrow(1, 0, q_heads + kv_heads), rope)  # q and k at once, in place
        q, k, v = heads.split((q_heads, kv_heads, kv_heads), 1)
        kv = heads.narrow(1, q_heads, 2 * kv_heads).unflatten(1, (2, kv_heads))  # [T, 2, kv heads, d]: k and v side by side
        out = self.attn.forward(q, k, v, meta, kv=kv)
        return self.o_proj.forward(out.reshape(hidden.shape[0], -1))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one column-parallel layer."""

    def __init__(self, arch: ModelArch, tp: TensorParallelGroup, quant: QuantConfig | None) -> None:
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [size, size], arch.mlp_bias, tp, quant)
        self.down_proj = RowParallelLinear(size, arch.hidden_size, arch.mlp_bias, tp, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward(x).chunk(2, -1)
        return self.down_proj.forward(torch.nn.functional.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallelGroup, quant: QuantConfig | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, tp, quant)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, tp, quant)

    def forward(self, rope: Rope, hidden: torch.Tensor, meta: Metadata) -> torch.Tensor:
        # submodules through .forward: nn.Module.__call__'s hook checks cost a few us a call, which
        # a small model's step pays dozens of times (no hooks are registered on a served model)
        hidden = hidden + self.self_attn.forward(rope, self.input_layernorm.forward(hidden), meta)
        return hidden + self.mlp.forward(self.post_attention_layernorm.forward(hidden))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallelGroup, max_positions: int, quant: QuantConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling, max_positions)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, tp, quant) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Metadata) -> torch.Tensor:
        hidden = self.embed_tokens.forward(input_ids)
        rope = self.rotary_emb.forward(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer.forward(rope, hidden, meta)
        return self.norm.forward(hidden)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a flat batch of tokens: [T] ids and positions -> [T, hidden]."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    """Checkpoint module name -> (fused module name, shard id)."""

    def __init__(self, arch: ModelArch, tp: TensorParallelGroup, max_positions: int, quant: QuantConfig | None = None) -> None:
        """`quant`: how the linear layers of the decoder hold their weights (None: the model dtype);
        the embeddings, norms and LM head always stay in the model dtype."""
        super().__init__()
        self.check_layout(arch, tp.size)
        self.arch = arch
        self.model = LlamaModel(arch, tp, max_positions, quant)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)
        if arch.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @staticmethod
    def check_layout(arch: ModelArch, tp_size: int) -> None:
        """Refuse, in vLLM's words, a tensor-parallel size the model cannot be split by."""
        divide(arch.num_heads, tp_size, "Total number of attention heads")
        if arch.num_kv_heads >= tp_size:
            divide(arch.num_kv_heads, tp_size, "Total number of key/value heads")
        elif tp_size % arch.num_kv_heads:
            raise ConfigError(
                f"Tensor parallel size ({tp_size}) must be divisible by the total number of key/value "
                f"heads ({arch.num_kv_heads}) when it exceeds it."
            )
        divide(arch.intermediate_size, tp_size, "Intermediate size")

    def ignored_checkpoint_tensors(self) -> list[re.Pattern]:
        """Checkpoint tensors that are known extras: read by nobody, and no error."""
        extras = [re.compile(r"rotary_emb\.inv_freq$"), re.compile(r"^rope_freqs\.weight$")]
        if self.arch.tie_word_embeddings:
            extras.append(re.compile(r"^lm_head\.weight$"))
        return extras

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Metadata) -> torch.Tensor:
        return self.model.forward(input_ids, positions, meta)

    def bind_kv_cache(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], pairs: list[torch.Tensor] | None = None
    ) -> None:
        """Give each layer's attention its K and V pools (and, where they are its halves, the
        [2, ...] tensor that holds both)."""
        for i, (layer, k, v) in enumerate(zip(self.model.layers, keys, values)):
            layer.self_attn.attn.kv_cache = (k, v)
            layer.self_attn.attn.kv_pair = pairs[i] if pairs is not None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0; None on the other ranks."""
        return self.lm_head.forward(hidden)
