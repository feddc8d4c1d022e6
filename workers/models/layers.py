"""Building blocks of Llama-family decoders that hold no tensor-parallel split of their own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from parallel.errors import ConfigError
from parallel.weights import replicated
from workers.config import RopeScaling

if TYPE_CHECKING:
    from kernels.paged_decode_attention import DecodeBlockPlan

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back, as transformers does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps, self.shape = eps, (size,)
        self.weight = replicated(nn.Parameter(torch.empty(size), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's rms_norm does these very operations in one call (in float32, the weight's product
        too); written out as in-place ops they cost the same at 1 - 2,048 tokens here, not less."""
        weight = self.weight
        if x.dtype is torch.float32 and weight.dtype is torch.float32:
            return torch.rms_norm(x, self.shape, weight, self.eps)
        return weight * torch.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """The rotary inverse frequencies theta^(-2i/d), rescaled as `scaling` says."""
    if scaling.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {scaling.rope_type!r} is not supported; shardlm supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rescaling: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in Hugging Face's layout: each head's two halves rotate together.

    x' = x cos(p f) + rotate_half(x) sin(p f) with rotate_half([a, b]) = [-b, a] and f the
    inverse frequencies, repeated over both halves. The table holds, per position, cos(p f) and
    sin(p f) with its first half negated, so that rotate_half(x) sin = swap_halves(x) sin_signed:
    the same products, bit for bit. It is a float32 buffer built after the model is materialised
    (it is computed, never loaded); every layer shares it.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_positions = head_dim, theta, scaling, max_positions
        self.register_buffer("cos_sin", torch.empty(max_positions, 2, 1, head_dim), persistent=False)

    def init_buffers(self) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        freqs = torch.arange(self.max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        sin = angles.sin()
        sin[:, : self.head_dim // 2].neg_()
        table = torch.stack([angles.cos(), sin], dim=1)[:, :, None, :]  # [positions, 2, 1, d]
        self.cos_sin = table.to(self.cos_sin.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [T, 1, d] for the tokens' positions [T]: looked up once per step, used by every layer."""
        cos_sin = self.cos_sin.index_select(0, positions)
        return (cos_sin if cos_sin.dtype == dtype else cos_sin.to(dtype)).unbind(1)


def apply_rotary_(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [T, heads, d] in place (it may be a strided view, such as the q and k heads of a
    fused projection's output) by the (cos, signed sin) of its tokens' positions."""
    cos, sin = rope
    swapped = x.roll(x.shape[-1] // 2, -1).mul_(sin)  # [b, a] for x = [a, b]
    return x.mul_(cos).add_(swapped)


@dataclass(frozen=True)
class AttentionMetadata:
    """Whole sequences attending to themselves, with no KV cache (checking logits, profiling)."""

    seq_lens: tuple[int, ...]


@dataclass(frozen=True)
class PagedMetadata:
    """One engine step over the paged KV cache: the first `num_decodes` tokens are one-token
    decodes, the rest are chunks of prompts (see kernels/ for the layouts).

    The int32 tables, lengths and query starts are the Triton kernels' inputs: a CPU step of
    decodes alone leaves them None (`ModelRunner.prepare_few_decodes`), as its torch path reads
    `decode_blocks` only."""

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    prefill_query_start: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    max_prefill_query_len: int = 0
    decode_blocks: DecodeBlockPlan | None = None
    """The CPU path's gather plan for the decodes (kernels.paged_decode_attention), made once per step."""
    prefill_spans: tuple[tuple[int, int, int], ...] = ()
    """The CPU path's (first token, end, context length) of each prompt chunk, its tokens counted from the first after the decodes."""


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal self-attention of each sequence over itself: q [T, h, d], k and v [T, h_kv, d].

    The plain-torch path; query head i reads key/value head i // (h / h_kv). The inputs go to
    SDPA as [1, heads, T, d]: given three dimensions it falls back to its slow path on CPU.
    """
    out = torch.empty_like(q)
    start = 0
    for length in meta.seq_lens:
        end = start + length
        seq = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seq, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        start = end
    return out


class Attention(nn.Module):
    """Attention of this rank's heads, over the paged KV cache once one is bound (`kv_cache`).

    With `PagedMetadata` the new keys and values are written to the cache first, then decodes and
    prompt chunks attend through their block tables: Triton kernels on CUDA, torch elsewhere (the
    references' maths; `kv_pair`, when bound, lets one op write or gather K and V together). An FP8
    cache stores K / k_scale and V / v_scale (one scale per layer).
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kv_pair = None
        self.k_scale = self.v_scale = 1.0

    @property
    def kv_pair(self) -> torch.Tensor | None:
        """[2, num_blocks, block_size, kv_heads, head_dim] whose halves are kv_cache's pools, or None."""
        return self._kv_pair

    @kv_pair.setter
    def kv_pair(self, pair: torch.Tensor | None) -> None:
        """Bind the pair, and the views of it a CPU step uses (made once, not in every layer of
        every step): `pair_slots` [2, slots, kv_heads, head_dim], `pair_rows` [2 * num_blocks,
        block elements] (None where the pair is not contiguous)."""
        self._kv_pair = pair
        contiguous = pair is not None and pair.is_contiguous()
        self.pair_slots = pair.view(2, -1, *pair.shape[3:]) if contiguous else None
        self.pair_rows = pair.view(2 * pair.shape[1], -1) if contiguous else None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata | PagedMetadata,
        kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k and v [T, H_kv, D]; `kv` [T, 2, H_kv, D], when given, holds k and v side by
        side (as a fused projection lays them out), so that one op writes both to `kv_pair`."""
        if isinstance(meta, AttentionMetadata):
            return causal_attention(q, k, v, meta, self.scale)
        if q.is_cuda:
            return self.forward_triton(q, k, v, meta)
        return self.forward_cpu(q, k, v, meta, kv)

    def scales(self) -> dict[str, float]:
        """The kernels' k_scale and v_scale for an FP8 cache (they scale and convert); none otherwise."""
        return dict(k_scale=self.k_scale, v_scale=self.v_scale) if self.kv_cache[0].dtype == torch.float8_e4m3fn else {}

    def forward_triton(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata) -> torch.Tensor:
        from kernels import paged_decode_attention as decode
        from kernels import prefill_attention as prefill
        from kernels import reshape_and_cache as cache

        key_cache, value_cache = self.kv_cache
        scales = self.scales()
        if not scales:
            k, v = k.to(key_cache.dtype), v.to(value_cache.dtype)
        cache.reshape_and_cache_triton(k.contiguous(), v.contiguous(), key_cache, value_cache, meta.slot_mapping, **scales)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            out[:n] = decode.paged_decode_attention_triton(
                q[:n].contiguous(),
                key_cache,
                value_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                self.scale,
                **scales,
            )
        if q.shape[0] > n:
            out[n:] = prefill.prefill_attention_triton(
                q[n:].contiguous(),
                key_cache,
                value_cache,
                meta.prefill_block_tables,
                meta.prefill_query_start,
                meta.prefill_context_lens,
                self.scale,
                meta.max_prefill_query_len,
                **scales,
            )
        return out

    def forward_cpu(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata, kv: torch.Tensor | None = None
    ) -> torch.Tensor:
        from kernels.paged_decode_attention import paged_decode_attention_blocks
        from kernels.prefill_attention import prefill_attention_cpu

        key_cache, value_cache = self.kv_cache
        scales = self.scales()
        if not scales and k.dtype != key_cache.dtype:
            k, v = k.to(key_cache.dtype), v.to(value_cache.dtype)
        if self.pair_slots is not None and kv is not None and not scales and kv.dtype == key_cache.dtype:
            self.pair_slots.index_copy_(1, meta.slot_mapping, kv.transpose(0, 1))
        else:
            from kernels.reshape_and_cache import reshape_and_cache_ref

            reshape_and_cache_ref(k, v, key_cache, value_cache, meta.slot_mapping, **scales)
        n, tokens = meta.num_decodes, q.shape[0]
        decoded = prefilled = None
        if n:
            decoded = paged_decode_attention_blocks(
                q if n == tokens else q[:n],
                key_cache,
                value_cache,
                meta.decode_blocks,
                self.scale,
                kv_pair=self.kv_pair,
                kv_rows=self.pair_rows,
                **scales,
            )
        if tokens > n:
            prefilled = prefill_attention_cpu(
                q[n:], k[n:], v[n:], key_cache, value_cache, meta.prefill_block_tables, meta.prefill_spans, self.scale, **scales
            )
        if prefilled is None or decoded is None:
            return decoded if prefilled is None else prefilled
        return torch.cat([decoded, prefilled])
