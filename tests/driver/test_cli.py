"""The `shardlm` command: generate on the embedded default, one-line errors, and bench load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import msgspec

from driver.cli import build_parser, main
from driver.report import LoadReport


SMALL_ENGINE = ["--max-model-len", "256", "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(16 * 2**20)]


def test_generate_on_the_default_model(ray_cluster, capsys) -> None:
    argv = ["generate", "--max-tokens", "4", "--temperature", "0", "--json", *SMALL_ENGINE, "The capital of France is", "Hi"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outputs"][0]["text"].startswith(" Paris") and len(out["outputs"]) == 2
    rank = out["load_report"]["ranks"][0]
    assert rank["load_format"] == "gguf" and rank["bytes_read"] == rank["checkpoint_bytes"]
    report = msgspec.json.decode(json.dumps(out["load_report"]), type=LoadReport)
    table = report.format()
    assert "engine start: default (SmolLM2-135M-Instruct.Q4_1.gguf)" in table
    assert all(f"  {phase} " in table for phase in ("discover", "placement", "workers", "weights", "profile", "kv_allocation", "tokenizer"))
    assert "peak host MiB" in table and f"KV cache: {report.num_blocks} blocks of 16 tokens" in table


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path) -> None:
    assert main(["generate", "--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("shardlm: error: model ") and "no such file or folder" in err[0]
    assert "--debug" in err[1] and len(err) == 2
    with pytest.raises(Exception, match="no such file or folder"):
        main(["--debug", "generate", "--model", str(tmp_path / "absent")])


def test_engine_flags_use_vllm_spellings() -> None:
    ns = build_parser().parse_args(["generate", "-tp", "2", "--max-model-len", "64", "--dtype", "float16", "--trust-remote-code"])
    assert (ns.tensor_parallel_size, ns.max_model_len, ns.dtype, ns.trust_remote_code) == (2, 64, "float16", True)
    assert ns.gpu_memory_utilization == 0.9 and ns.load_format == "auto"


def test_bench_load_reports_both_libraries(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama")
    done = subprocess.run(
        [sys.executable, "-m", "driver", "bench", "load", "--model", str(folder), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for impl in ("shardlm", "transformers"):
        assert results[impl]["seconds"] > 0
        assert results[impl]["peak_after_forward"] >= results[impl]["peak_after_load"] > 0
