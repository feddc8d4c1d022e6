"""The memory profile and the paged KV cache of one rank.

After loading, each rank answers how many bytes it can give its KV cache beside the largest step
(`max_num_batched_tokens` tokens, logits for `max_num_seqs` rows). On CUDA it runs that step and
measures the peak; on CPU, where the budget is a share of free RAM, it takes an upper bound of
the step's activations instead (`cpu_activation_bound`, held to a measured peak by the tests), so
that the start does not spend seconds on a forward pass. The driver turns bytes into blocks,
takes the minimum over ranks, and every rank allocates exactly that many: per layer a K pool and a V pool of shape
[num_blocks + 1, block_size, kv_heads_per_rank, head_dim], the two halves of one tensor. Block 0 is the null block: zeroed,
never handed out, it is where padding in block tables and gathers points, so that reading past
a context never meets uninitialised memory (0 x NaN is NaN even under a zero attention weight).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
import psutil
import torch

from parallel.errors import ConfigError, InsufficientMemory
from workers.config import EngineConfig
from workers.cuda_graphs import cuda_graphs_wanted, pool_reserve_bytes
from workers.loader import parameter_bytes
from workers.models.layers import AttentionMetadata

if TYPE_CHECKING:
    from workers.worker import Worker

NULL_BLOCKS = 1
"""Blocks allocated besides the usable ones: block 0, always zero."""
CPU_KV_SHARE = 0.25
"""On CPU without kv_cache_memory_bytes: this share of the node's available memory goes to the
KV cache, split evenly among the ranks on the node (less the activations where they need more
than the rest)."""
CPU_FIXED_BYTES = 8 * 2**20
"""Part of `cpu_activation_bound`: small tensors of a step (ids, positions, norms' statistics)."""
CPU_THREAD_BYTES = 2**20
"""Part of `cpu_activation_bound`, per torch thread: the scratch of CPU flash attention (a
256 x 512 float32 tile of scores per thread, with its row statistics) and of matrix products."""


class MemoryProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank measured around its profiling forward pass."""

    rank: int
    kv_cache_bytes: int
    """Bytes this rank can give its KV cache (may be <= 0: no room)."""
    total_bytes: int
    """The device's memory (the node's available memory on CPU)."""
    weights_bytes: int
    peak_activation_bytes: int
    """Memory the largest step takes beyond the weights: its measured peak on CUDA, an upper
    bound on CPU (`cpu_activation_bound`)."""
    non_torch_bytes: int
    """Device memory not held by torch's allocator: CUDA context, NCCL buffers (CUDA only)."""
    seconds: float
    budget: str
    """How kv_cache_bytes was derived, in words."""
    cuda_graph_bytes: int = 0
    """Set aside for the decode step's CUDA graphs (`workers.cuda_graphs.pool_reserve_bytes`)."""


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """Key/value heads each rank holds: its share, or one replicated head when p exceeds h_kv."""
    return max(1, num_kv_heads // tp_size)


def kv_cache_dtype(config: EngineConfig) -> torch.dtype:
    """The dtype the pools store: the model's, or float8 e4m3 with kv_cache_dtype="fp8"."""
    return torch.float8_e4m3fn if config.cache.kv_cache_dtype == "fp8" else getattr(torch, config.model.dtype)


def kv_block_bytes(config: EngineConfig, tp_size: int) -> int:
    """Bytes of one block on one rank: 2 (K, V) x layers x block_size x kv_heads_per_rank x head_dim x dtype."""
    arch = config.model.arch
    dtype_bytes = kv_cache_dtype(config).itemsize
    heads = kv_heads_per_rank(arch.num_kv_heads, tp_size)
    return 2 * arch.num_layers * config.cache.block_size * heads * arch.head_dim * dtype_bytes


def profile_batch(config: EngineConfig) -> list[int]:
    """Sequence lengths of the profiling batch: max_num_batched_tokens tokens, none longer than max_model_len."""
    remaining, max_len, lengths = config.scheduler.max_num_batched_tokens, config.model.max_model_len, []
    while remaining > 0 and len(lengths) < config.scheduler.max_num_seqs:
        lengths.append(min(max_len, remaining))
        remaining -= lengths[-1]
    return lengths


@torch.inference_mode()
def _profile_forward(worker: Worker) -> None:
    """The largest step: max_num_batched_tokens tokens through the model, and logits for as many
    rows as a step samples at most (max_num_seqs)."""
    lengths = profile_batch(worker.config)
    ids = torch.zeros(sum(lengths), dtype=torch.long, device=worker.device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(worker.device)
    hidden = worker.model(ids, positions, AttentionMetadata(seq_lens=tuple(lengths)))
    worker.model.compute_logits(hidden[-worker.config.scheduler.max_num_seqs :])


def cpu_activation_bound(config: EngineConfig, tp_size: int, threads: int) -> int:
    """An upper bound on the bytes a CPU rank allocates beyond its weights in the largest step.

    With T the step's tokens, b the model dtype's bytes, H the hidden size and, on this rank, I the
    intermediate size and q, kv the widths of the query and key/value heads: every tensor a layer
    makes, summed as if all lived at once, T b (3H + 4I + 6q + 6kv) (residual, norm output and
    result; gate_up, its activation and product; qkv, the rotated q and k and their temporaries,
    attention's output), plus the norms' float32 temporaries 12 T H and the rotary tables
    T 2 d (4 + b). The logits of `max_num_seqs` rows over this rank's vocabulary share, and on
    rank 0 with p > 1 the gathered pieces and their concatenation; for a quantized layer, its
    weight widened for the product (three copies at 4 bytes). Attention never holds T x T
    scores: torch's CPU flash attention works in tiles (`CPU_THREAD_BYTES` a thread).
    """
    arch, lengths = config.model.arch, profile_batch(config)
    tokens, rows = sum(lengths), min(config.scheduler.max_num_seqs, sum(lengths))
    b = getattr(torch, config.model.dtype).itemsize
    hidden, inter = arch.hidden_size, arch.intermediate_size // tp_size
    q = arch.num_heads // tp_size * arch.head_dim
    kv = kv_heads_per_rank(arch.num_kv_heads, tp_size) * arch.head_dim
    per_token = b * (3 * hidden + 4 * inter + 6 * q + 6 * kv) + 12 * hidden + 2 * arch.head_dim * (4 + b)
    vocab = -(-arch.vocab_size // (64 * tp_size)) * 64 * tp_size  # padded as the LM head pads it
    logits = rows * b * (vocab // tp_size + (2 * vocab if tp_size > 1 else 0))
    widened = 3 * 4 * hidden * max(2 * inter, q + 2 * kv) if config.model.quantization is not None else 0
    return tokens * per_token + logits + widened + CPU_FIXED_BYTES + threads * CPU_THREAD_BYTES


def profile_memory(worker: Worker, local_ranks: int, node_memory: int | None) -> MemoryProfile:
    """This rank's KV budget beside the largest step: on CUDA measured around a forward pass of
    it, on CPU from `cpu_activation_bound` (see the module docstring)."""
    config, start = worker.config, time.perf_counter()
    weights = parameter_bytes(worker.model)
    if worker.device.type != "cuda":
        activations = cpu_activation_bound(config, worker.world_size, torch.get_num_threads())
        kv, total, budget = _cpu_budget(config, local_ranks, node_memory, activations)
        return MemoryProfile(
            rank=worker.rank,
            kv_cache_bytes=kv,
            total_bytes=total,
            weights_bytes=weights,
            peak_activation_bytes=activations,
            non_torch_bytes=0,
            seconds=time.perf_counter() - start,
            budget=budget,
        )
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(worker.device)
    _profile_forward(worker)
    torch.cuda.synchronize(worker.device)
    free, total = torch.cuda.mem_get_info(worker.device)
    peak = torch.cuda.max_memory_allocated(worker.device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(worker.device))
    util = config.cache.gpu_memory_utilization
    graphs = 0
    if cuda_graphs_wanted(config)[0]:
        graphs = pool_reserve_bytes(
            max(0, peak - weights), config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs
        )
    kv = config.cache.kv_cache_memory_bytes or int(util * total) - peak - non_torch - graphs
    budget = (
        "kv_cache_memory_bytes"
        if config.cache.kv_cache_memory_bytes
        else f"gpu_memory_utilization {util} x {total} B - peak torch {peak} B - non-torch {non_torch} B"
        + (f" - CUDA graphs {graphs} B" if graphs else "")
    )
    return MemoryProfile(
        rank=worker.rank,
        kv_cache_bytes=kv,
        total_bytes=total,
        weights_bytes=weights,
        peak_activation_bytes=max(0, peak - weights),
        non_torch_bytes=non_torch,
        seconds=time.perf_counter() - start,
        budget=budget,
        cuda_graph_bytes=graphs,
    )


def _cpu_budget(config: EngineConfig, local_ranks: int, node_memory: int | None, activations: int = 0) -> tuple[int, int, str]:
    """(KV bytes, the memory they are a share of, how): kv_cache_memory_bytes, else this rank's
    share of the node's available memory, CPU_KV_SHARE of it at most and less `activations`."""
    if config.cache.kv_cache_memory_bytes:
        return config.cache.kv_cache_memory_bytes, psutil.virtual_memory().total, "kv_cache_memory_bytes"
    available = psutil.virtual_memory().available
    if node_memory:
        available = min(available, node_memory)
    share = available // max(1, local_ranks)
    kv = min(int(CPU_KV_SHARE * share), share - activations)
    return (
        kv,
        available,
        (
            f"min({CPU_KV_SHARE} x, 1 x - activation bound {activations} B) of {available} B available on the node "
            f"/ {local_ranks} ranks there"
        ),
    )


def kv_bytes_per_token(config: EngineConfig, tp_size: int) -> int:
    """KV-cache bytes one token takes on one rank."""
    return kv_block_bytes(config, tp_size) // config.cache.block_size


def usable_blocks(kv_bytes: int, block_bytes: int) -> int:
    """Blocks a budget of `kv_bytes` holds besides the null block."""
    return max(0, kv_bytes // block_bytes - NULL_BLOCKS)


def choose_num_blocks(config: EngineConfig, profiles: list[MemoryProfile]) -> int:
    """The block count every rank allocates: the minimum over ranks, or num_gpu_blocks_override.

    Raises `InsufficientMemory` when there is no room for one block, and `ConfigError` when
    max_model_len does not fit in the pool.
    """
    tp = config.parallel.tensor_parallel_size
    block_bytes = kv_block_bytes(config, tp)
    poorest = min(profiles, key=lambda p: p.kv_cache_bytes)
    blocks = usable_blocks(poorest.kv_cache_bytes, block_bytes)
    if config.cache.num_gpu_blocks_override is not None:
        blocks = config.cache.num_gpu_blocks_override
    elif blocks < 1:
        raise InsufficientMemory(
            f"no room for the KV cache on rank {poorest.rank}: it can give {poorest.kv_cache_bytes} bytes "
            f"({poorest.budget}), and the null block and one more take {2 * block_bytes} bytes. Raise gpu_memory_utilization or "
            "kv_cache_memory_bytes, use more ranks (tensor_parallel_size), or lower max_num_batched_tokens"
        )
    check_pool_fits(config, blocks)
    return blocks


def check_pool_fits(config: EngineConfig, blocks: int) -> None:
    """A `ConfigError` when one sequence of max_model_len tokens would not fit in `blocks` blocks."""
    block_size, max_len = config.cache.block_size, config.model.max_model_len
    capacity = blocks * block_size
    if max_len > capacity:
        raise ConfigError(
            f"max_model_len={max_len} does not fit in the KV cache: each rank's pool holds {blocks} blocks "
            f"of {block_size} tokens = {capacity} tokens. Set max_model_len <= {capacity}, or give the cache "
            "more memory (gpu_memory_utilization, kv_cache_memory_bytes, num_gpu_blocks_override) or more ranks"
        )


class KVCache:
    """One rank's paged KV cache: per layer, K and V pools [num_blocks + 1, block_size, kv_heads, head_dim],
    block 0 the null block."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], pairs: list[torch.Tensor] | None = None) -> None:
        self.keys, self.values = keys, values
        self.pairs = pairs
        """Per layer, [2, num_blocks + 1, block_size, kv_heads, head_dim]: the K pool and the V pool
        (keys[i] is pairs[i][0], values[i] is pairs[i][1]), so that one op writes or gathers both."""

    @property
    def num_blocks(self) -> int:
        """Usable blocks (the null block not counted)."""
        return self.keys[0].shape[0] - NULL_BLOCKS if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @classmethod
    def allocate(cls, config: EngineConfig, tp_size: int, num_blocks: int, device: torch.device) -> KVCache:
        arch = config.model.arch
        shape = (num_blocks + NULL_BLOCKS, config.cache.block_size, kv_heads_per_rank(arch.num_kv_heads, tp_size), arch.head_dim)
        dtype = kv_cache_dtype(config)
        try:
            pairs = [torch.empty((2, *shape), dtype=dtype, device=device) for _ in range(arch.num_layers)]
        except torch.OutOfMemoryError as exc:
            raise InsufficientMemory(f"allocating {num_blocks} KV blocks of shape {shape} failed: {exc}") from exc
        for pair in pairs:
            pair[:, :NULL_BLOCKS].zero_()
        return cls([p[0] for p in pairs], [p[1] for p in pairs], pairs)
