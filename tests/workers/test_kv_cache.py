"""KV-cache sizing: bytes per block, the minimum over ranks, the override, the errors, and the CPU bound
of a step's activations held to a measured peak."""

from __future__ import annotations

import json

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
    return EngineArgs(
        model=str(folder), device="cpu", tensor_parallel_size=2, max_num_batched_tokens=600, max_num_seqs=4
    ).create_engine_config()


def profile(rank: int, kv: int) -> MemoryProfile:
    return MemoryProfile(
        rank=rank,
        kv_cache_bytes=kv,
        total_bytes=0,
        weights_bytes=0,
        peak_activation_bytes=0,
        non_torch_bytes=0,
        seconds=0.0,
        budget="test",
    )


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
    share = available // 4
    assert _cpu_budget(config, 4, 2**30, activations=share - 1000)[0] == 1000, "the activations come first"
    fixed = msgspec.structs.replace(config, cache=msgspec.structs.replace(config.cache, kv_cache_memory_bytes=12345))
    assert _cpu_budget(fixed, 4, None)[0] == 12345


def test_allocation_shapes(config) -> None:
    cache = KVCache.allocate(config, 2, 5, torch.device("cpu"))
    assert len(cache.keys) == len(cache.values) == 2 and cache.num_blocks == 5
    assert cache.keys[0].shape == (6, 16, 2, 8) and cache.keys[0].dtype == torch.float32
    assert cache.nbytes == 6 * kv_block_bytes(config, 2)
    assert not cache.keys[1][0].any() and not cache.values[0][0].any(), "the null block is zero"


def measured_peak(step) -> int:
    """The most bytes torch's CPU allocator held at once during `step()`, beyond what it held before."""
    profiler = pytest.importorskip("torch.profiler")
    event_type = pytest.importorskip("torch._C._profiler")._EventType
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.typed[0] == event_type.Allocation:
            sizes.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


STEP_SHAPES = {
    "gqa, one long sequence": dict(hidden=64, inter=128, heads=8, kv_heads=2, vocab=512, tokens=2048, seqs=4, max_len=2048),
    "several sequences": dict(hidden=64, inter=128, heads=8, kv_heads=2, vocab=512, tokens=2048, seqs=8, max_len=256),
    "attention-heavy": dict(hidden=256, inter=256, heads=16, kv_heads=16, vocab=1000, tokens=1024, seqs=1, max_len=1024),
    "logits-heavy": dict(hidden=128, inter=256, heads=2, kv_heads=1, vocab=32000, tokens=256, seqs=256, max_len=256),
    "SmolLM2's layer": dict(hidden=576, inter=1536, heads=9, kv_heads=3, vocab=49152, tokens=512, seqs=256, max_len=8192),
    "bfloat16": dict(
        hidden=128,
        inter=512,
        heads=4,
        kv_heads=2,
        vocab=4096,
        tokens=1024,
        seqs=64,
        max_len=1024,
        dtype="bfloat16",
    ),
    "int8": dict(hidden=128, inter=512, heads=4, kv_heads=2, vocab=4096, tokens=512, seqs=16, max_len=512, quantization="int8"),
}


@pytest.mark.parametrize("shape", list(STEP_SHAPES), ids=list(STEP_SHAPES))
def test_cpu_activation_bound_holds_the_measured_peak(shape, tmp_path) -> None:
    """The CPU budget takes `cpu_activation_bound` for the largest step's activations: it must not
    be below what the step really allocates, nor far above it."""
    from workers.kv_cache import CPU_FIXED_BYTES, CPU_THREAD_BYTES, _profile_forward, cpu_activation_bound
    from workers.worker import Worker

    s = dict(STEP_SHAPES[shape])
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                architectures=["LlamaForCausalLM"],
                model_type="llama",
                hidden_size=s["hidden"],
                intermediate_size=s["inter"],
                num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"],
                vocab_size=s["vocab"],
                num_hidden_layers=2,
                max_position_embeddings=s["max_len"],
                tie_word_embeddings=True,
            )
        )
    )
    config = EngineArgs(
        model=str(tmp_path),
        load_format="dummy",
        device="cpu",
        dtype=s.get("dtype", "float32"),
        quantization=s.get("quantization"),
        max_num_batched_tokens=s["tokens"],
        max_num_seqs=s["seqs"],
    ).create_engine_config()
    worker = Worker(config)
    worker.init_device()
    try:
        worker.load_model()
        _profile_forward(worker)  # first calls allocate once-only state (kernels' caches)
        peak = measured_peak(lambda: _profile_forward(worker))
        bound = cpu_activation_bound(config, 1, torch.get_num_threads())
    finally:
        worker.shutdown()
    slack = CPU_FIXED_BYTES + torch.get_num_threads() * CPU_THREAD_BYTES
    assert peak <= bound <= 4 * peak + slack, f"measured {peak} B, bound {bound} B"
