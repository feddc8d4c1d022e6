"""`shardlm plan`: does it fit? Per-rank weights, KV bytes per token, KV capacity, from the
model's config alone: no weights read, no GPU needed.

Weights are counted exactly: the planner builds each rank's model on the meta device, the same
way the engine does, so padding (vocabulary) and replication (KV heads) are included. The KV
budget is exact given kv_cache_memory_bytes; from a GPU's memory it is
gpu_memory_utilization x memory - weights - an activation estimate - a reserve for the CUDA
context and NCCL, which the engine measures instead.
"""

from __future__ import annotations

import re

import msgspec

from driver.args import EngineArgs
from parallel.errors import ConfigError
from parallel.state import TensorParallelGroup
from workers.config import EngineConfig
from workers.kv_cache import kv_block_bytes, kv_bytes_per_token, usable_blocks
from workers.loader import build_on_meta, parameter_bytes, process_weights_after_loading

CUDA_RESERVE_BYTES = 768 * 2**20
"""Planned for the CUDA context, NCCL buffers and allocator slack (the engine measures them)."""
SIZE = re.compile(r"^\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


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

    @property
    def fits(self) -> bool:
        return self.valid and self.problem is None

    def format(self) -> str:
        gib = 2**30
        weights = f", {self.quantization} weights" if self.quantization else ""
        kv = f", {self.kv_cache_dtype} KV cache" if self.kv_cache_dtype != "auto" else ""
        head = (
            f"plan: {self.model} ({self.architecture}), {self.dtype}{weights}{kv} on {self.device}, "
            f"tensor_parallel_size={self.tensor_parallel_size}"
        )
        if not self.valid:
            return f"{head}\n  does not split: {self.problem}"
        lines = [
            head,
            f"  weights per rank          {self.weight_bytes_per_rank / gib:10.3f} GiB",
            f"  KV bytes per token, rank  {self.kv_bytes_per_token_per_rank:10d}",
            f"  KV budget per rank        {self.kv_budget_bytes_per_rank / gib:10.3f} GiB  ({self.kv_budget})",
            f"  KV blocks                 {self.num_blocks:10d}  of {self.block_size} tokens",
            f"  token capacity            {self.token_capacity:10d}",
            f"  sequences of {self.max_model_len} tokens {self.max_len_sequences:6d}",
        ]
        lines.append(f"  does not fit: {self.problem}" if self.problem else "  fits")
        return "\n".join(lines)


def parse_size(text: str) -> int:
    """Bytes from '80GiB', '80 GB', '8e10' (GB = 1e9, GiB = 2**30)."""
    match = SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in UNITS:
        raise ConfigError(f"cannot read {text!r} as a size: write e.g. 80GiB, 40GB or 8e10")
    return int(float(match.group(1)) * UNITS[unit])


def activation_estimate(config: EngineConfig) -> int:
    """Peak activations of the largest step, estimated: per batched token the hidden state (a few
    copies), this rank's q/k/v and gate/up outputs, plus float32 logits for the sampled rows."""
    arch, tp = config.model.arch, config.parallel.tensor_parallel_size
    itemsize = _itemsize(config.model.dtype)
    per_token = 4 * arch.hidden_size + (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim // tp + 3 * arch.intermediate_size // tp
    logits = config.scheduler.max_num_seqs * arch.vocab_size * 4
    return config.scheduler.max_num_batched_tokens * per_token * itemsize + logits


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def plan(args: EngineArgs, device: str = "cuda", gpu_memory: int | None = None, capability: tuple[int, int] = (9, 0)) -> Plan:
    """What the engine would allocate for `args` on GPUs of `gpu_memory` bytes (or with
    kv_cache_memory_bytes), computed without weights or a GPU."""
    found = args.find_model()
    config = args.create_engine_config(device=device, capability=capability if device == "cuda" else None, found=found)
    arch, tp = config.model.arch, args.tensor_parallel_size
    base = dict(
        model=config.model.model or f"default ({config.model.gguf_file})", architecture=arch.architecture,
        tensor_parallel_size=tp, dtype=config.model.dtype, device=device, block_size=config.cache.block_size,
        quantization=config.model.quantization.method if config.model.quantization else None,
        kv_cache_dtype=config.cache.kv_cache_dtype,
        max_model_len=config.model.max_model_len,
    )
    try:
        model = build_on_meta(config, TensorParallelGroup(rank=0, size=tp))
        process_weights_after_loading(model)  # 4-bit layers: the kernel's layout, as the engine keeps it
    except ConfigError as exc:
        return Plan(**base, valid=False, problem=str(exc))
    weights = parameter_bytes(model)
    budget, how = _kv_budget(config, weights, gpu_memory)
    blocks = usable_blocks(budget, kv_block_bytes(config, tp))
    if config.cache.num_gpu_blocks_override is not None:
        blocks, how = config.cache.num_gpu_blocks_override, "num_gpu_blocks_override"
    capacity = blocks * config.cache.block_size
    problem = None
    if blocks < 1:
        problem = f"no room for one KV block: the budget is {budget} bytes per rank"
    elif capacity < config.model.max_model_len:
        problem = f"max_model_len={config.model.max_model_len} exceeds the pool's {capacity} tokens; set max_model_len <= {capacity}"
    return Plan(
        **base, valid=True, problem=problem, weight_bytes_per_rank=weights,
        kv_bytes_per_token_per_rank=kv_bytes_per_token(config, tp), kv_budget_bytes_per_rank=max(0, budget),
        kv_budget=how, num_blocks=blocks, token_capacity=capacity,
        max_len_sequences=capacity // config.model.max_model_len,
    )


def _kv_budget(config: EngineConfig, weights: int, gpu_memory: int | None) -> tuple[int, str]:
    if config.cache.kv_cache_memory_bytes:
        return config.cache.kv_cache_memory_bytes, "kv_cache_memory_bytes"
    if gpu_memory is None:
        raise ConfigError("give the GPUs' memory (gpu_memory, e.g. 80GiB) or kv_cache_memory_bytes to plan the KV cache")
    util = config.cache.gpu_memory_utilization
    activations = activation_estimate(config)
    budget = int(util * gpu_memory) - weights - activations - CUDA_RESERVE_BYTES
    return budget, (
        f"{util} x {gpu_memory} B - weights - activations ~{activations} B - reserve {CUDA_RESERVE_BYTES} B"
    )
