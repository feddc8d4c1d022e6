"""`shardlm plan`: does it fit? Per-rank weights, KV bytes per token, KV capacity, from the
model's config alone: no weights read or downloaded, no GPU needed.

The model is a folder with config.json, a Hub repo id (only its config and tokenizer files are
fetched, or taken from the cache offline) or a .gguf file (its metadata). Weights are counted
exactly: the planner builds each rank's model on the meta device, the same way the engine does,
so padding (vocabulary), replication (KV heads) and 4-bit layouts (GPTQ, AWQ: packed weights,
scales and zero points, as `quantization_config` in config.json declares them) are included.
The KV budget is exact given kv_cache_memory_bytes; from a GPU's memory it is
gpu_memory_utilization x memory - weights - an activation estimate - a reserve for the CUDA
context and NCCL, which the engine measures instead.

When it does not fit, the plan says by how much per rank and which single change would make it
fit: the largest max_model_len, the smallest tensor_parallel_size, an FP8 KV cache or FP8 weights.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import msgspec

from driver.config.args import EngineArgs
from driver.config.model_config import load_hf_config, model_arch
from driver.config.units import format_gib, parse_size
from parallel.errors import ConfigError
from parallel.state import TensorParallelGroup
from workers.config import EngineConfig, ModelArch
from workers.kv_cache import NULL_BLOCKS, kv_block_bytes, kv_bytes_per_token, usable_blocks
from workers.loader import build_on_meta, parameter_bytes, process_weights_after_loading
from workers.model_files import ModelFiles, find_model
from workers.sharded_state import is_sharded_state

__all__ = ["CUDA_RESERVE_BYTES", "Plan", "Suggestion", "activation_estimate", "find_config", "parse_size", "plan"]

CUDA_RESERVE_BYTES = 768 * 2**20
"""Planned for the CUDA context, NCCL buffers and allocator slack (the engine measures them)."""


class Suggestion(msgspec.Struct, kw_only=True):
    """A change of the engine arguments with which the plan fits."""

    changes: dict[str, int | str]
    """EngineArgs fields and their new values, e.g. {"max_model_len": 27392}."""
    detail: str = ""
    """What the plan is then, e.g. "8.75 GiB weights per rank, 490240 tokens"."""

    def format(self) -> str:
        return " ".join(f"{k}={v!r}" for k, v in self.changes.items()) + (f" ({self.detail})" if self.detail else "")


class Plan(msgspec.Struct, kw_only=True):
    model: str
    architecture: str
    tensor_parallel_size: int
    dtype: str
    device: str
    quantization: str | None = None
    """The linear layers' weights: None (dtype), "fp8", "int8", "gptq" or "awq"."""
    kv_cache_dtype: str = "auto"
    valid: bool
    """Whether the layout splits at this tensor-parallel size."""
    problem: str | None = None
    """Why it does not (the engine's own message), or why the cache does not fit."""
    weight_bytes_per_rank: int = 0
    kv_bytes_per_token_per_rank: int = 0
    block_size: int = 0
    kv_budget_bytes_per_rank: int = 0
    kv_budget: str = ""
    """How the budget was derived."""
    num_blocks: int = 0
    token_capacity: int = 0
    max_model_len: int = 0
    max_len_sequences: int = 0
    """How many sequences of max_model_len tokens the pool holds at once."""
    shortfall_bytes_per_rank: int = 0
    """What each rank lacks for one sequence of max_model_len tokens; 0 when it fits."""
    split_sizes: list[int] = []
    """The tensor-parallel sizes at which the layout splits (given when it does not split)."""
    suggestions: list[Suggestion] = []
    """Single changes with which it would fit, the least costly first; empty when it fits."""

    @property
    def fits(self) -> bool:
        return self.valid and self.problem is None

    def to_builtins(self) -> dict[str, Any]:
        """The plan as JSON-ready builtins, `fits` included."""
        return {**msgspec.to_builtins(self), "fits": self.fits}

    def format(self) -> str:
        weights = f", {self.quantization} weights" if self.quantization else ""
        kv = f", {self.kv_cache_dtype} KV cache" if self.kv_cache_dtype != "auto" else ""
        head = (
            f"plan: {self.model} ({self.architecture}), {self.dtype}{weights}{kv} on {self.device}, "
            f"tensor_parallel_size={self.tensor_parallel_size}"
        )
        if not self.valid:
            lines = [head, f"  does not split: {self.problem}"]
        else:
            lines = [
                head,
                f"  weights per rank          {format_gib(self.weight_bytes_per_rank, 3):>14}",
                f"  KV bytes per token, rank  {self.kv_bytes_per_token_per_rank:10d}",
                f"  KV budget per rank        {format_gib(self.kv_budget_bytes_per_rank, 3):>14}  ({self.kv_budget})",
                f"  KV blocks                 {self.num_blocks:10d}  of {self.block_size} tokens",
                f"  token capacity            {self.token_capacity:10d}",
                f"  sequences of {self.max_model_len} tokens {self.max_len_sequences:6d}",
                f"  does not fit: {self.problem}" if self.problem else "  fits",
            ]
        lines += [f"  would fit with {s.format()}" for s in self.suggestions]
        return "\n".join(lines)


def activation_estimate(config: EngineConfig) -> int:
    """Peak activations of the largest step, estimated: per batched token the hidden state (a few
    copies), this rank's q/k/v and gate/up outputs, plus float32 logits for the sampled rows."""
    arch, tp = config.model.arch, config.parallel.tensor_parallel_size
    itemsize = _itemsize(config.model.dtype)
    per_token = (
        4 * arch.hidden_size + (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim // tp + 3 * arch.intermediate_size // tp
    )
    logits = config.scheduler.max_num_seqs * arch.vocab_size * 4
    return config.scheduler.max_num_batched_tokens * per_token * itemsize + logits


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


Found = tuple[ModelFiles, Any, ModelArch]


def find_config(args: EngineArgs) -> Found:
    """The model's config without its weights: (files, config, architecture), as
    `EngineArgs.find_model` answers, with only config and tokenizer files fetched for a repo id.
    A local sharded_state folder is read as such (its manifest fixes dtype and quantization)."""
    args.validate()
    files = find_model(args.model, args.revision, args.download_dir, load_format="dummy")
    if files.source == "folder" and args.load_format in ("auto", "sharded_state") and is_sharded_state(Path(files.folder)):
        files = find_model(args.model, args.revision, args.download_dir, args.load_format)
    hf_config = load_hf_config(files)
    return files, hf_config, model_arch(hf_config, files)


def plan(
    args: EngineArgs,
    device: str = "cuda",
    gpu_memory: int | str | None = None,
    capability: tuple[int, int] = (9, 0),
) -> Plan:
    """What the engine would allocate for `args` on GPUs of `gpu_memory` (bytes, or a size such
    as "80GiB"), or with kv_cache_memory_bytes, computed without weights or a GPU. A plan that
    does not fit carries the shortfall and the suggestions."""
    if isinstance(gpu_memory, str):
        gpu_memory = parse_size(gpu_memory)
    found = find_config(args)
    result = _plan(args, found, device, gpu_memory, capability)
    if result.fits:
        return result
    sizes = [] if result.valid else split_sizes(args, found, device, capability)
    alternatives = _alternatives(args, found, device, gpu_memory, capability, result)
    return msgspec.structs.replace(result, split_sizes=sizes, suggestions=alternatives)


def _engine_config(args: EngineArgs, found: Found, device: str, capability: tuple[int, int]) -> EngineConfig:
    return args.create_engine_config(device=device, capability=capability if device == "cuda" else None, found=found)


def _plan(args: EngineArgs, found: Found, device: str, gpu_memory: int | None, capability: tuple[int, int]) -> Plan:
    config = _engine_config(args, found, device, capability)
    arch, tp = config.model.arch, args.tensor_parallel_size
    base = dict(
        model=config.model.model or f"default ({config.model.gguf_file})",
        architecture=arch.architecture,
        tensor_parallel_size=tp,
        dtype=config.model.dtype,
        device=device,
        block_size=config.cache.block_size,
        quantization=config.model.quantization.method if config.model.quantization else None,
        kv_cache_dtype=config.cache.kv_cache_dtype,
        max_model_len=config.model.max_model_len,
    )
    try:
        weights = rank_weight_bytes(config, tp)
    except ConfigError as exc:
        return Plan(**base, valid=False, problem=str(exc))
    block_bytes = kv_block_bytes(config, tp)
    if config.cache.num_gpu_blocks_override is not None:
        blocks = config.cache.num_gpu_blocks_override
        budget, how = (blocks + NULL_BLOCKS) * block_bytes, f"num_gpu_blocks_override={blocks}"
    else:
        budget, how = _kv_budget(config, weights, gpu_memory)
        blocks = usable_blocks(budget, block_bytes)
    capacity, max_len = blocks * config.cache.block_size, config.model.max_model_len
    needed = (-(-max_len // config.cache.block_size) + NULL_BLOCKS) * block_bytes
    short = needed - budget if capacity < max_len else 0
    return Plan(
        **base,
        valid=True,
        problem=_shortfall(config, weights, gpu_memory, needed, short, capacity) if short else None,
        weight_bytes_per_rank=weights,
        kv_bytes_per_token_per_rank=kv_bytes_per_token(config, tp),
        kv_budget_bytes_per_rank=max(0, budget),
        kv_budget=how,
        num_blocks=blocks,
        token_capacity=capacity,
        max_len_sequences=capacity // max_len,
        shortfall_bytes_per_rank=short,
    )


@functools.lru_cache(maxsize=64)
def rank_weight_bytes(config: EngineConfig, tp: int) -> int:
    """Bytes of rank 0's parameters in the layout the engine computes with; a `ConfigError`
    (the engine's own) when the model does not split into `tp` ranks."""
    model = build_on_meta(config, TensorParallelGroup(rank=0, size=tp))
    process_weights_after_loading(model)  # 4-bit layers: the kernel's layout, as the engine keeps it
    return parameter_bytes(model)


def _kv_budget(config: EngineConfig, weights: int, gpu_memory: int | None) -> tuple[int, str]:
    if config.cache.kv_cache_memory_bytes:
        return config.cache.kv_cache_memory_bytes, "kv_cache_memory_bytes"
    if gpu_memory is None:
        raise ConfigError(
            "give the GPUs' memory (gpu_memory, e.g. 80GiB) or kv_cache_memory_bytes to plan the KV cache", field="gpu_memory"
        )
    util = config.cache.gpu_memory_utilization
    activations = activation_estimate(config)
    budget = int(util * gpu_memory) - weights - activations - CUDA_RESERVE_BYTES
    return budget, (
        f"{util} x {format_gib(gpu_memory)} - weights - activations ~{format_gib(activations)} - reserve {format_gib(CUDA_RESERVE_BYTES)}"
    )


def _shortfall(config: EngineConfig, weights: int, gpu_memory: int | None, needed: int, short: int, capacity: int) -> str:
    """By how much, in GiB, and what takes the memory."""
    cache, max_len = config.cache, config.model.max_model_len
    sequence = f"one sequence of max_model_len={max_len} tokens needs {format_gib(needed)} of KV cache"
    holds = f"holds {capacity} tokens" if capacity else "holds no block"
    if cache.num_gpu_blocks_override is not None:
        return f"{format_gib(short)} short per rank: {sequence}; num_gpu_blocks_override={cache.num_gpu_blocks_override} {holds}"
    if cache.kv_cache_memory_bytes:
        return (
            f"{format_gib(short)} short per rank: {sequence}; kv_cache_memory_bytes={cache.kv_cache_memory_bytes} "
            f"({format_gib(cache.kv_cache_memory_bytes)}) {holds}"
        )
    activations = activation_estimate(config)
    usable = int(cache.gpu_memory_utilization * gpu_memory)
    total = weights + activations + CUDA_RESERVE_BYTES + needed
    return (
        f"{format_gib(short)} short per rank: weights {format_gib(weights)} + activations ~{format_gib(activations)} + "
        f"reserve {format_gib(CUDA_RESERVE_BYTES)} + KV cache for one sequence of max_model_len={max_len} tokens "
        f"{format_gib(needed)} = {format_gib(total)}, but a rank may use gpu_memory_utilization="
        f"{cache.gpu_memory_utilization} x {format_gib(gpu_memory)} = {format_gib(usable)}"
    )


def split_sizes(args: EngineArgs, found: Found, device: str, capability: tuple[int, int]) -> list[int]:
    """The tensor-parallel sizes, among the divisors of the attention heads, at which the model
    splits: the engine's own checks (heads, KV heads, MLP, 4-bit groups), on one layer, as every
    layer splits alike."""
    sizes = []
    for tp in _divisors(found[2].num_heads):
        try:
            config = _engine_config(dataclasses.replace(args, tensor_parallel_size=tp), found, device, capability)
            one_layer = msgspec.structs.replace(config.model, arch=msgspec.structs.replace(config.model.arch, num_layers=1))
            rank_weight_bytes(msgspec.structs.replace(config, model=one_layer), tp)
        except ConfigError:
            continue
        sizes.append(tp)
    return sizes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _alternatives(
    args: EngineArgs, found: Found, device: str, gpu_memory: int | None, capability: tuple[int, int], result: Plan
) -> list[Suggestion]:
    """The changes with which it fits: the largest max_model_len, the smallest
    tensor_parallel_size, an FP8 KV cache, FP8 weights, or both."""
    suggestions = []
    if result.valid and result.token_capacity > 0:
        suggestions.append(Suggestion(changes={"max_model_len": result.token_capacity}, detail="the most the KV cache holds"))
    for tp in _divisors(found[2].num_heads):
        if tp != args.tensor_parallel_size:
            if (fit := _try(args, found, device, gpu_memory, capability, tensor_parallel_size=tp)) is not None:
                suggestions.append(
                    Suggestion(changes={"tensor_parallel_size": tp}, detail=_describe(fit, "the smallest that fits"))
                )
                break
    if not result.valid:
        return suggestions
    options = []
    if args.kv_cache_dtype == "auto":
        options.append({"kv_cache_dtype": "fp8"})
    if args.quantization is None and result.quantization is None:
        options.append({"quantization": "fp8"})
        if len(options) == 2:
            options.append({"quantization": "fp8", "kv_cache_dtype": "fp8"})
    for changes in options:
        if (fit := _try(args, found, device, gpu_memory, capability, **changes)) is not None:
            suggestions.append(Suggestion(changes=changes, detail=_describe(fit)))
            break
    return suggestions


def _try(
    args: EngineArgs, found: Found, device: str, gpu_memory: int | None, capability: tuple[int, int], **changes: Any
) -> Plan | None:
    """The plan with `changes`, where it fits."""
    try:
        fit = _plan(dataclasses.replace(args, **changes), found, device, gpu_memory, capability)
    except ConfigError:
        return None
    return fit if fit.fits else None


def _describe(fit: Plan, note: str = "") -> str:
    what = f"{format_gib(fit.weight_bytes_per_rank)} weights per rank, {fit.token_capacity} tokens of KV cache"
    return f"{note}: {what}" if note else what
