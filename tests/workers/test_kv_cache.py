"""KV-cache sizing: bytes per block, the minimum over ranks, the override, and the errors."""

from __future__ import annotations

import msgspec
import pytest
import torch

from driver import EngineArgs
from parallel.errors import ConfigError, InsufficientMemory
from workers.kv_cache import (
    CPU_KV_SHARE,
    KVCache,
    MemoryProfile,
    _cpu_budget,
    choose_num_blocks,
    kv_block_bytes,
    kv_heads_per_rank,
    profile_batch,
)


@pytest.fixture
def config(tiny_checkpoint):
    """Tiny Llama: 2 layers, 4 KV heads of 8 dims, float32, block_size 16, max_model_len 256."""
    folder, _ = tiny_checkpoint("llama_8h4kv")
    return EngineArgs(model=str(folder), device="cpu", tensor_parallel_size=2, max_num_batched_tokens=600,
                      max_num_seqs=4).create_engine_config()


def profile(rank: int, kv: int) -> MemoryProfile:
    return MemoryProfile(rank=rank, kv_cache_bytes=kv, total_bytes=0, weights_bytes=0, peak_activation_bytes=0,
                         non_torch_bytes=0, seconds=0.0, budget="test")


def test_kv_heads_per_rank() -> None:
    assert [kv_heads_per_rank(4, p) for p in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert kv_heads_per_rank(3, 3) == 1


def test_block_bytes(config) -> None:
    assert kv_block_bytes(config, 2) == 2 * 2 * 16 * 2 * 8 * 4
    assert kv_block_bytes(config, 1) == 2 * kv_block_bytes(config, 2)


def test_the_poorest_rank_sets_the_count(config) -> None:
    block = kv_block_bytes(config, 2)
    assert choose_num_blocks(config, [profile(0, 100 * block), profile(1, 37 * block + 5)]) == 36  # and the null block


def test_override_wins(config) -> None:
    overridden = msgspec.structs.replace(config, cache=msgspec.structs.replace(config.cache, num_gpu_blocks_override=16))
    assert choose_num_blocks(overridden, [profile(0, 10**12), profile(1, 10**12)]) == 16


def test_no_room_and_too_long(config) -> None:
    block = kv_block_bytes(config, 2)
    with pytest.raises(InsufficientMemory, match=rf"rank 1: it can give {2 * block - 1} bytes"):
        choose_num_blocks(config, [profile(0, 10 * block), profile(1, 2 * block - 1)])
    with pytest.raises(ConfigError, match=r"holds 10 blocks of 16 tokens = 160 tokens\. Set max_model_len <= 160"):
        choose_num_blocks(config, [profile(0, 11 * block), profile(1, 11 * block)])


def test_profile_batch_respects_max_model_len_and_max_num_seqs(config) -> None:
    assert profile_batch(config) == [256, 256, 88]
    few = msgspec.structs.replace(config, scheduler=msgspec.structs.replace(config.scheduler, max_num_seqs=2))
    assert profile_batch(few) == [256, 256]


def test_cpu_budget_is_shared_by_the_ranks_of_a_node(config) -> None:
    kv, available, _ = _cpu_budget(config, local_ranks=4, node_memory=2**30)
    assert available <= 2**30 and kv == int(CPU_KV_SHARE * available / 4)
    fixed = msgspec.structs.replace(config, cache=msgspec.structs.replace(config.cache, kv_cache_memory_bytes=12345))
    assert _cpu_budget(fixed, 4, None)[0] == 12345


def test_allocation_shapes(config) -> None:
    cache = KVCache.allocate(config, 2, 5, torch.device("cpu"))
    assert len(cache.keys) == len(cache.values) == 2 and cache.num_blocks == 5
    assert cache.keys[0].shape == (6, 16, 2, 8) and cache.keys[0].dtype == torch.float32
    assert cache.nbytes == 6 * kv_block_bytes(config, 2)
    assert not cache.keys[1][0].any() and not cache.values[0][0].any(), "the null block is zero"
