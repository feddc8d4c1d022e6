"""The planner: exact weights and KV figures without weights or a GPU, the engine's layout errors."""

from __future__ import annotations

import json

import pytest

from driver import EngineArgs
from driver.cli import main
from driver.planner import CUDA_RESERVE_BYTES, activation_estimate, parse_size, plan
from parallel.errors import ConfigError

GIB = 2**30


def test_sizes() -> None:
    assert parse_size("80GiB") == 80 * GIB and parse_size("40 GB") == 40 * 10**9 and parse_size("8e10") == 8 * 10**10
    assert parse_size("512M") == 512 * 2**20
    with pytest.raises(ConfigError, match="cannot read '80ZB' as a size"):
        parse_size("80ZB")


def test_smollm2_on_gpus(smollm2_gguf) -> None:
    """SmolLM2 (135M parameters, 30 layers, 3 KV heads of 64) in bfloat16 at three ranks."""
    args = EngineArgs(model=str(smollm2_gguf), tensor_parallel_size=3)
    result = plan(args, "cuda", 80 * GIB)
    assert result.valid and result.fits and result.dtype == "bfloat16"
    assert result.kv_bytes_per_token_per_rank == 2 * 30 * 1 * 64 * 2
    embedding = 16384 * 576 * 2  # the vocabulary padded to 49152 = 3 x 16384 rows, tied with the LM head
    per_layer = (3 * 64 + 2 * 64) * 576 + 576 * 192 + 2 * 512 * 576 + 576 * 512 + 2 * 576  # qkv, o, gate/up, down, norms
    assert result.weight_bytes_per_rank == embedding + 30 * per_layer * 2 + 576 * 2
    config = args.create_engine_config(device="cuda", capability=(9, 0))
    budget = int(0.9 * 80 * GIB) - result.weight_bytes_per_rank - activation_estimate(config) - CUDA_RESERVE_BYTES
    assert result.kv_budget_bytes_per_rank == budget
    assert result.num_blocks == budget // (16 * result.kv_bytes_per_token_per_rank) - 1
    assert result.max_len_sequences == result.token_capacity // 8192


def test_smollm2_quantized_with_an_fp8_kv_cache(smollm2_gguf) -> None:
    """int8 / fp8 linear weights: one byte each plus a float32 scale per output row; embeddings and
    norms stay bfloat16. An FP8 KV cache halves the bytes per token."""
    bf16 = plan(EngineArgs(model=str(smollm2_gguf), tensor_parallel_size=3), "cuda", 80 * GIB)
    embedding_and_norms = 16384 * 576 * 2 + (30 * 2 + 1) * 576 * 2
    rows = (3 * 64 + 2 * 64) + 576 + 2 * 512 + 576  # qkv, o, gate/up, down: output rows per rank
    linear = 30 * ((3 * 64 + 2 * 64) * 576 + 576 * 192 + 2 * 512 * 576 + 576 * 512)
    for method in ("int8", "fp8"):
        args = EngineArgs(model=str(smollm2_gguf), tensor_parallel_size=3, quantization=method, kv_cache_dtype="fp8")
        result = plan(args, "cuda", 80 * GIB)
        assert result.fits and result.quantization == method and result.kv_cache_dtype == "fp8"
        assert result.weight_bytes_per_rank == embedding_and_norms + linear + 30 * rows * 4
        assert result.kv_bytes_per_token_per_rank * 2 == bf16.kv_bytes_per_token_per_rank
        assert f"{method} weights, fp8 KV cache" in result.format()


def test_layouts_that_do_not_split_say_so_as_the_engine_does(smollm2_gguf) -> None:
    result = plan(EngineArgs(model=str(smollm2_gguf), tensor_parallel_size=2), "cuda", 80 * GIB)
    assert not result.valid and result.problem == "Total number of attention heads (9) must be divisible by tensor parallel size (2)."


def test_a_pool_too_small_for_max_model_len(smollm2_gguf) -> None:
    result = plan(EngineArgs(model=str(smollm2_gguf), kv_cache_memory_bytes=64 * 2**20), "cpu")
    tokens = (64 * 2**20 // (16 * 2 * 30 * 3 * 64 * 4) - 1) * 16  # float32 on CPU, the null block kept aside
    assert tokens == 1440
    assert result.valid and not result.fits and f"set max_model_len <= {tokens}" in result.problem


def test_cli_plan(smollm2_gguf, capsys) -> None:
    assert main(["plan", "--model", str(smollm2_gguf), "-tp", "3", "--gpu-memory", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] and out["tensor_parallel_size"] == 3 and out["num_blocks"] > 0
    assert main(["plan", "--model", str(smollm2_gguf), "-tp", "2", "--gpu-memory", "24GiB"]) == 1
    assert "does not split: Total number of attention heads (9)" in capsys.readouterr().out
