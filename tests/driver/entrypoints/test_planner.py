"""The planner: exact weights and KV figures from a config alone (no weights, no GPU), the
engine's layout errors, by how much a plan does not fit and what would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driver import EngineArgs
from driver.config.units import format_gib, parse_size
from driver.entrypoints.cli import main
from driver.entrypoints.planner import CUDA_RESERVE_BYTES, activation_estimate, plan
from parallel.errors import ConfigError
from tests.helpers import make_hub_cache

GIB = 2**30
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
"""Llama-3.1-70B's config.json: 70.55e9 parameters, 141.1 GB in bfloat16."""
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}


def config_folder(folder: Path, **changes) -> Path:
    """A model folder holding only config.json: LLAMA3_70B with `changes`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA3_70B, **changes}))
    return folder


def llama3_70b_4bit_bytes() -> int:
    """GPTQ Llama-3-70B on one rank, in the layout the 4-bit kernel computes with: 4 bits a weight,
    a float16 scale and zero point per group of 128 inputs and output, an int32 g_idx per input;
    the embedding, LM head and norms stay float16."""
    h, inter, layers, vocab = 8192, 28672, 80, 128256
    shapes = [(h, (64 + 2 * 8) * 128), (h, h), (h, 2 * inter), (inter, h)]  # (inputs, outputs): qkv, o, gate/up, down
    linear = sum(i * o // 2 + 2 * (i // 128) * o * 2 + 4 * i for i, o in shapes)
    return layers * (linear + 2 * h * 2) + 2 * vocab * h * 2 + h * 2


def test_sizes_take_units() -> None:
    assert parse_size("80GiB") == parse_size("80gib") == parse_size("80G") == parse_size("80 GiB") == 80 * GIB
    assert parse_size("80GB") == parse_size("80gb") == 80 * 10**9 and parse_size("81920MiB") == 80 * GIB
    assert parse_size("1.5TiB") == 1536 * GIB and parse_size("512M") == 512 * 2**20 and parse_size("8e10B") == 8 * 10**10
    assert parse_size("4096", bare="bytes") == 4096
    with pytest.raises(ConfigError, match="cannot read '80ZB' as a memory size: write e.g. 80GiB"):
        parse_size("80ZB")
    for bare, meant in [("80", "80GiB"), ("81920", "81920MiB"), ("85899345920", "85899345920B (80.00 GiB)")]:
        with pytest.raises(
            ConfigError, match=rf"'{bare}' has no unit: did you mean {meant.replace('(', '[(]').replace(')', '[)]')}\?"
        ):
            parse_size(bare)
    assert format_gib(35278831616) == "32.86 GiB" and format_gib(16 * 2**20) == "16.0 MiB"


def test_llama3_70b_from_config_json_alone(tmp_path) -> None:
    """No weight files: the figures come from config.json. 70.55e9 bfloat16 parameters over four
    ranks: 35.3 GB each (the vocabulary splits evenly, nothing is replicated but the norms)."""
    folder = config_folder(tmp_path / "llama-3-70b")
    result = plan(EngineArgs(model=str(folder), tensor_parallel_size=4), "cuda", "80GiB")
    assert result.fits and result.dtype == "bfloat16" and result.max_model_len == 131072
    assert abs(result.weight_bytes_per_rank - 35.3e9) < 0.01 * 35.3e9
    assert result.kv_bytes_per_token_per_rank == 2 * 80 * 2 * 128 * 2  # K and V, 80 layers, 2 of 8 KV heads, bf16
    assert result.max_len_sequences == result.token_capacity // 131072 == 3
    assert result.suggestions == [] and result.shortfall_bytes_per_rank == 0


def test_a_plan_that_does_not_fit_says_by_how_much_and_what_would(tmp_path) -> None:
    """Two ranks of 80 GiB: 65.7 GiB of weights each leave room for 27392 tokens, not 131072."""
    folder = config_folder(tmp_path / "llama-3-70b")
    result = plan(EngineArgs(model=str(folder), tensor_parallel_size=2), "cuda", 80 * GIB)
    assert result.valid and not result.fits and result.token_capacity == 27392
    config = EngineArgs(model=str(folder), tensor_parallel_size=2, load_format="dummy").create_engine_config(
        device="cuda", capability=(9, 0)
    )
    needed = (131072 // 16 + 1) * 16 * result.kv_bytes_per_token_per_rank  # the null block kept aside
    budget = int(0.9 * 80 * GIB) - result.weight_bytes_per_rank - activation_estimate(config) - CUDA_RESERVE_BYTES
    assert result.shortfall_bytes_per_rank == needed - budget
    assert result.problem.startswith(f"{format_gib(needed - budget)} short per rank: weights 65.71 GiB + ")
    assert "bytes per rank" not in result.problem and "-" not in result.problem.split(":")[0]
    assert [s.changes for s in result.suggestions] == [
        {"max_model_len": 27392},
        {"tensor_parallel_size": 4},
        {"quantization": "fp8"},
    ]
    assert "would fit with max_model_len=27392" in result.format()
    one_rank = plan(EngineArgs(model=str(folder)), "cuda", 80 * GIB)  # the weights alone exceed the GPU
    assert one_rank.num_blocks == 0 and one_rank.kv_budget_bytes_per_rank == 0
    assert [s.changes for s in one_rank.suggestions] == [{"tensor_parallel_size": 4}]
    assert one_rank.to_builtins()["fits"] is False and one_rank.to_builtins()["suggestions"][0]["changes"] == {
        "tensor_parallel_size": 4
    }


def test_a_layout_that_does_not_split_names_the_sizes_that_do(tmp_path) -> None:
    result = plan(EngineArgs(model=str(config_folder(tmp_path / "m")), tensor_parallel_size=3), "cuda", 80 * GIB)
    assert (
        not result.valid
        and result.problem == "Total number of attention heads (64) must be divisible by tensor parallel size (3)."
    )
    assert result.split_sizes == [1, 2, 4, 8, 16, 32, 64]
    assert [s.changes for s in result.suggestions] == [{"tensor_parallel_size": 4}]


@pytest.mark.parametrize("scheme", [GPTQ, AWQ], ids=["gptq", "awq"])
def test_4bit_checkpoints_are_planned_from_quantization_config(tmp_path, scheme) -> None:
    """One rank: 37.8 GiB of 4-bit weights, too much with a bfloat16 cache of 131072 tokens
    (40 GiB); an FP8 cache (20 GiB) fits."""
    folder = config_folder(tmp_path / "m", torch_dtype="float16", quantization_config=scheme)
    result = plan(EngineArgs(model=str(folder)), "cuda", 80 * GIB)
    assert result.quantization == scheme["quant_method"] and result.dtype == "float16"
    assert abs(result.weight_bytes_per_rank - llama3_70b_4bit_bytes()) < 0.001 * llama3_70b_4bit_bytes()
    if scheme is GPTQ:
        assert result.weight_bytes_per_rank == llama3_70b_4bit_bytes()
    assert not result.fits and [s.changes for s in result.suggestions][-1] == {"kv_cache_dtype": "fp8"}
    assert not any("quantization" in s.changes for s in result.suggestions)  # already 4-bit


def test_a_hub_repo_id_from_a_cache_holding_only_config_json(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    make_hub_cache(cache, "meta-llama/Llama-3.1-70B-Instruct", config_folder(tmp_path / "source"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = EngineArgs(model="meta-llama/Llama-3.1-70B-Instruct", download_dir=str(cache), tensor_parallel_size=4)
    result = plan(args, "cuda", 80 * GIB)
    assert result.fits and abs(result.weight_bytes_per_rank - 35.3e9) < 0.01 * 35.3e9


def test_smollm2_on_gpus(smollm2_gguf) -> None:
    """SmolLM2 (135M parameters, 30 layers, 3 KV heads of 64) in bfloat16 at three ranks, from its
    GGUF file's metadata."""
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
    assert (
        not result.valid
        and result.problem == "Total number of attention heads (9) must be divisible by tensor parallel size (2)."
    )


def test_a_pool_too_small_for_max_model_len(smollm2_gguf) -> None:
    result = plan(EngineArgs(model=str(smollm2_gguf), kv_cache_memory_bytes=64 * 2**20), "cpu")
    block = 16 * 2 * 30 * 3 * 64 * 4  # float32 on CPU
    tokens = (64 * 2**20 // block - 1) * 16  # the null block kept aside
    assert tokens == 1440
    assert result.valid and not result.fits and result.suggestions[0].changes == {"max_model_len": tokens}
    assert result.shortfall_bytes_per_rank == (8192 // 16 + 1) * block - 64 * 2**20
    assert f"kv_cache_memory_bytes={64 * 2**20} (64.0 MiB) holds {tokens} tokens" in result.problem
    assert len(result.suggestions) == 1  # 3 ranks hold 4320 tokens, an FP8 cache 5760: neither is 8192


def test_cli_plan(smollm2_gguf, capsys) -> None:
    assert main(["plan", "--model", str(smollm2_gguf), "-tp", "3", "--gpu-memory", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] and out["fits"] and out["tensor_parallel_size"] == 3 and out["num_blocks"] > 0
    assert main(["plan", "--model", str(smollm2_gguf), "-tp", "2", "--gpu-memory", "24GiB"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("shardlm: error: -tp 2 does not split the model: Total number of attention heads (9)")
    assert "It splits into 1, 3 ranks; use -tp 1 (the smallest that fits" in captured.err
    assert main(["plan", "--model", str(smollm2_gguf), "-tp", "2", "--gpu-memory", "24GiB", "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # still one JSON object on stdout, the error line on stderr
    assert (out["valid"], out["fits"], out["split_sizes"]) == (False, False, [1, 3]) and captured.err.count("\n") == 1
    assert main(["plan", "--model", str(smollm2_gguf), "--kv-cache-memory-bytes", "64MiB", "--device", "cpu"]) == 3
    out = capsys.readouterr().out
    assert "does not fit: " in out and "would fit with --max-model-len 1440 (the most the KV cache holds)" in out
