"""Tensor parallelism on Ray workers (CPU, gloo): logits against transformers at several sizes,
slice-only reads, and the KV pool every rank allocates."""

from __future__ import annotations

import pytest
import torch

from driver import LLM, EngineArgs
from driver.entrypoints.planner import plan
from parallel.errors import ConfigError
from tests.helpers import reference_logits
from workers.kv_cache import kv_block_bytes

PROMPTS = [[1, 17, 42, 99, 5, 250, 299, 3, 64, 128, 7], [2, 200], list(range(30, 60))]
TOLERANCE = 1e-4
SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=8 * 2**20, device="cpu")
SMOLLM2 = dict(SMALL, max_model_len=512, kv_cache_memory_bytes=32 * 2**20)
# SmolLM2 at three ranks (logits, greedy text, bytes and pages per rank): tests/e2e/test_generate.py


def check_logits(llm: LLM, hf, prompts) -> None:
    for mine, ref in zip(llm.prompt_logits(prompts), reference_logits(hf, prompts)):
        torch.testing.assert_close(mine, ref, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "family,tp",
    [("llama_8h4kv", 2), ("llama_8h2kv", 4)],
    ids=["8h4kv-tp2", "8h2kv-tp4-replicated-kv"],
)  # one rank through Ray: tests/e2e/test_generate.py; at three: SmolLM2 there
def test_tiny_llama_logits_match_transformers(ray_cluster, tiny_checkpoint, family, tp) -> None:
    folder, hf = tiny_checkpoint(family)
    with LLM(str(folder), tensor_parallel_size=tp, skip_tokenizer_init=True, **SMALL) as llm:
        check_logits(llm, hf, PROMPTS)
        report = llm.load_report
        assert [r.rank for r in report.ranks] == list(range(tp))
        assert {r.world_size for r in report.ranks} == {tp}
        check_every_rank_allocates_the_minimum(llm, tp)


def check_every_rank_allocates_the_minimum(llm: LLM, tp: int) -> None:
    report = llm.load_report
    planned = plan(
        EngineArgs(model=llm.config.model.model, tensor_parallel_size=tp, skip_tokenizer_init=True, **SMALL), device="cpu"
    )
    assert [r.weight_device_bytes for r in report.ranks] == [planned.weight_bytes_per_rank] * tp
    assert (planned.num_blocks, planned.token_capacity) == (report.num_blocks, report.token_capacity)
    block = kv_block_bytes(llm.config, tp)
    assert report.num_blocks == min(p.kv_cache_bytes for p in report.memory) // block - 1  # the null block
    assert report.kv_cache_bytes == [(report.num_blocks + 1) * block] * tp
    assert report.token_capacity == report.num_blocks * 16


def test_smollm2_at_two_ranks_is_refused_before_any_worker_starts(ray_cluster, smollm2_gguf) -> None:
    from ray.util import placement_group_table

    before = len(placement_group_table())
    with pytest.raises(
        ConfigError, match=r"^Total number of attention heads \(9\) must be divisible by tensor parallel size \(2\)\.$"
    ):
        LLM(str(smollm2_gguf), tensor_parallel_size=2, **SMOLLM2)
    assert len(placement_group_table()) == before


def test_wide_rows_each_rank_touches_about_half(ray_cluster, tiny_checkpoint) -> None:
    folder, hf = tiny_checkpoint("llama_wide")
    with LLM(str(folder), tensor_parallel_size=2, skip_tokenizer_init=True, **SMALL) as llm:
        check_logits(llm, hf, PROMPTS[:2])
        for rank in llm.load_report.ranks:
            pages_bytes = rank.pages_touched * 4096
            assert rank.bytes_read <= 0.6 * rank.checkpoint_bytes, rank
            assert pages_bytes <= 0.6 * rank.checkpoint_bytes, rank


def test_block_override_and_a_pool_too_small_for_max_model_len(ray_cluster, tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama_8h4kv")
    with LLM(str(folder), skip_tokenizer_init=True, num_gpu_blocks_override=20, **SMALL) as llm:
        assert llm.load_report.num_blocks == 20
    with pytest.raises(
        ConfigError, match=r"max_model_len=256 does not fit .* holds 4 blocks of 16 tokens = 64 tokens\. Set max_model_len <= 64"
    ):
        LLM(str(folder), skip_tokenizer_init=True, num_gpu_blocks_override=4, **SMALL)
