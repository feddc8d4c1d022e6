"""The `shardlm` command: generate on the embedded default, one-line errors, and bench load."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import msgspec
import pytest

from cluster.logs import log_to_stderr
from driver.engine.report import LoadReport
from driver.entrypoints.cli import (
    DEFAULT_PROMPT,
    FlagSpelling,
    all_parsers,
    build_parser,
    changed_engine_args,
    error_line,
    main,
    read_prompts,
    sampling_params_from,
    typed_sampling,
)
from parallel.errors import ConfigError
from workers.sampling_params import SamplingParams

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
    assert all(
        f"  {phase} " in table
        for phase in ("discover", "placement", "workers", "weights", "profile", "kv_allocation", "tokenizer", "warmup")
    )
    assert "peak host MiB" in table and f"KV cache: {report.num_blocks} blocks of 16 tokens" in table


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path) -> None:
    assert main(["generate", "--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardlm: error: model ") and "no such file or folder" in err[0]
    assert main(["--debug", "generate", "--model", str(tmp_path / "absent")]) == 2  # the traceback, then the line
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-1].startswith("shardlm: error: model ")


def test_messages_name_the_flags_as_typed() -> None:
    """What Python spells `max_model_len=999999` the command line spells `--max-model-len 999999`;
    `-tp` where the user typed it; paths and other words are left alone."""
    spell = FlagSpelling(build_parser(), ["plan", "-tp", "3", "--max-model-len", "999999"])
    assert (
        spell("max_model_len=999999 is larger; use max_model_len <= 131072")
        == "--max-model-len 999999 is larger; use --max-model-len <= 131072"
    )
    assert spell("tensor_parallel_size=3 does not split") == "-tp 3 does not split"
    assert spell("dtype='fp32' is not one of 'auto'", "dtype") == "--dtype fp32 is not one of 'auto'"
    cuda = "device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'"
    assert spell(cuda, "device") == "--device cuda was asked for, but torch sees no CUDA device; use --device cpu or 'auto'"
    assert spell("temperature must be non-negative, got -1.0", "temperature") == "--temperature must be non-negative, got -1.0"
    assert spell("give the GPUs' memory (gpu_memory, e.g. 80GiB)") == "give the GPUs' memory (--gpu-memory, e.g. 80GiB)"
    assert spell("/data/max_model_len/config.json has no model") == "/data/max_model_len/config.json has no model"
    assert spell("raise gpu_memory_utilization") == "raise --gpu-memory-utilization"
    error = ConfigError("kv_cache_memory_bytes=7 holds no block\nat all", field="kv_cache_memory_bytes")
    assert error_line(error, spell) == "shardlm: error: --kv-cache-memory-bytes 7 holds no block; at all"


def test_every_flag_of_every_command_has_help() -> None:
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in all_parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == []
    commands = [a for p in all_parsers(build_parser()) for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(choice.help for action in commands for choice in action._choices_actions)


def test_help_gives_exit_codes_and_where_sampling_defaults_come_from() -> None:
    commands = {p.prog: p for p in all_parsers(build_parser())}
    plan = commands["shardlm plan"].format_help()
    assert "0 it fits; 2 bad input" in plan and "3 it does not\nfit" in plan and "-tp 4 --gpu-memory 80GiB" in plan
    generate = " ".join(commands["shardlm generate"].format_help().split())
    assert "the model's own defaults from its generation_config.json" in generate and "--generation-config vllm" in generate


def test_sampling_flags_pass_only_what_was_typed() -> None:
    """Nothing typed: None, and the engine applies its defaults (the model's generation_config.json);
    typed flags go over the model's defaults, which go over the command's own (chat's 256 tokens)."""
    parse = build_parser().parse_args
    model = SimpleNamespace(generation_defaults=SimpleNamespace(values={"temperature": 0.6, "top_p": 0.9, "max_tokens": 512}))
    bare = SimpleNamespace()  # an engine without generation defaults
    assert typed_sampling(parse(["generate"])) == {}
    assert sampling_params_from(model, {}) is None and sampling_params_from(bare, {}) is None
    typed = typed_sampling(parse(["generate", "--temperature", "0", "--top-k", "5"]))
    assert typed == {"temperature": 0.0, "top_k": 5}
    assert sampling_params_from(model, typed) == SamplingParams(temperature=0.0, top_p=0.9, top_k=5, max_tokens=512)
    assert sampling_params_from(bare, typed) == SamplingParams(temperature=0.0, top_k=5)
    chat = {"max_tokens": 256}
    assert sampling_params_from(bare, {}, fallback=chat) == SamplingParams(max_tokens=256)
    assert sampling_params_from(model, {}, fallback=chat).max_tokens == 512
    assert sampling_params_from(model, {"max_tokens": 9}, fallback=chat).max_tokens == 9
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\], got 1.5") as refused:
        typed_sampling(parse(["chat", "--top-p", "1.5"]))
    assert refused.value.field == "top_p"


def test_engine_flags_use_vllm_spellings() -> None:
    ns = build_parser().parse_args(["generate", "-tp", "2", "--max-model-len", "64", "--dtype", "float16", "--trust-remote-code"])
    assert (ns.tensor_parallel_size, ns.max_model_len, ns.dtype, ns.trust_remote_code) == (2, 64, "float16", True)
    assert ns.gpu_memory_utilization == 0.9 and ns.load_format == "auto"


def test_a_setting_on_by_default_has_a_no_flag() -> None:
    parse = build_parser().parse_args
    assert parse(["generate"]).enable_prefix_caching is True
    assert "enable_prefix_caching" not in changed_engine_args(parse(["generate"]))
    assert changed_engine_args(parse(["generate", "--no-enable-prefix-caching"]))["enable_prefix_caching"] is False


def test_bench_load_reports_both_libraries(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama")
    done = subprocess.run(
        [sys.executable, "-m", "driver", "bench", "load", "--model", str(folder), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for impl in ("shardlm", "transformers"):
        assert results[impl]["seconds"] > 0
        assert results[impl]["peak_after_forward"] >= results[impl]["peak_after_load"] > 0


def test_prompts_come_from_arguments_files_and_stdin(tmp_path, monkeypatch) -> None:
    parse = build_parser().parse_args
    text_file, jsonl_file = tmp_path / "prompts.txt", tmp_path / "prompts.jsonl"
    text_file.write_text("one\n\n  two  \n")
    jsonl_file.write_text('{"prompt": "three", "id": 7}\n"four"\n')
    assert read_prompts(parse(["generate", "zero", "--prompts-file", str(text_file)])) == ["zero", "one", "  two  "]
    assert read_prompts(parse(["generate", "--prompts-file", str(jsonl_file)])) == ["three", "four"]
    monkeypatch.setattr("sys.stdin", io.StringIO("five\nsix\n"))
    assert read_prompts(parse(["generate", "a", "-", "b"])) == ["a", "five", "six", "b"]
    monkeypatch.setattr("sys.stdin", io.StringIO("seven\n"))
    monkeypatch.setattr("driver.entrypoints.cli.stdin_is_piped", lambda: True)
    assert read_prompts(parse(["generate"])) == ["seven"]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert read_prompts(parse(["generate"])) == [DEFAULT_PROMPT]  # an empty pipe: the default prompt


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, ["--prompts-file", "{f}"], "does not exist"),
        ("\n \n", ["--prompts-file", "{f}"], "holds no prompt"),
        ('{"text": "x"}\n', ["--prompts-file", "{f}.jsonl"], 'line 1: no "prompt" string'),
        ("", ["-"], "stdin gave none"),
    ],
)
def test_prompt_sources_that_give_nothing_are_one_line_errors(tmp_path, monkeypatch, capsys, content, args, message) -> None:
    target = tmp_path / "prompts"
    if content is not None:
        (tmp_path / ("prompts.jsonl" if "{f}.jsonl" in args else "prompts")).write_text(content)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", *[a.replace("{f}", str(target)) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardlm: error: ") and message in err[0]
    assert "one prompt a line" in err[0] or "echo" in err[0] or '{"prompt"' in err[0]


def test_quiet_and_debug_go_before_or_after_every_command() -> None:
    parse = build_parser().parse_args
    for command in (["generate"], ["chat"], ["plan"], ["bench", "load", "--model", "m"], ["bench", "throughput"]):
        assert parse([*command, "--quiet"]).quiet and parse(["-q", *command]).quiet
        assert parse([*command, "--debug"]).debug and parse(["--debug", *command]).debug
        assert not parse(command).quiet and not parse(command).debug
    chat = parse(["chat", "--message", "Hi", "--system", "Be brief.", "--max-tokens", "9"])
    assert (chat.message, chat.system, chat.max_tokens, chat.temperature) == ("Hi", "Be brief.", 9, None)


def test_shardlm_logs_go_to_stderr_at_the_level_asked_and_to_the_actors(capsys) -> None:
    log = logging.getLogger("shardlm.driver.test")
    before = os.environ.get("SHARDLM_LOG_LEVEL")
    with log_to_stderr(logging.INFO):
        assert os.environ["SHARDLM_LOG_LEVEL"] == "INFO"  # what the engine's actors are given
        log.info("shown")
        log.debug("hidden")
    log.warning("after")  # no handler of ours any more: Python's last resort prints warnings bare
    err = capsys.readouterr().err
    assert " shardlm.driver.test: shown" in err and err.startswith("INFO ") and "hidden" not in err
    assert os.environ.get("SHARDLM_LOG_LEVEL") == before


def test_the_flags_are_read_from_engine_args_source_and_importing_the_command_needs_no_torch() -> None:
    from dataclasses import fields

    from driver.config.args import EngineArgs
    from driver.entrypoints.cli import engine_fields

    assert [(f.name, f.type, f.default) for f in engine_fields()] == [(f.name, f.type, f.default) for f in fields(EngineArgs)]
    script = (
        "import sys; from driver.entrypoints.cli import build_parser; build_parser().parse_args(['generate', '-tp', '2']); "
        "from driver import LLM; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "torch is imported by LLM(...), beside Ray's start"


def test_bench_start_times_each_phase_of_fresh_starts(tiny_checkpoint) -> None:
    """One fresh process that starts its own local cluster (whose workers inherit its environment)."""
    from driver.entrypoints.bench.start import format_bench_start, summarize

    folder, _ = tiny_checkpoint("llama")
    engine = ["--model", str(folder), "--device", "cpu", "--skip-tokenizer-init", *SMALL_ENGINE]
    done = subprocess.run(
        [sys.executable, "-m", "driver", "bench", "start", "--repeat", "1", "--json", *engine],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert len(runs) == 1 and runs[0]["device"] == "cpu" and runs[0]["local_cluster"]
    assert list(runs[0]["phases"]) == [
        "discover",
        "placement",
        "driver_actor",
        "workers",
        "weights",
        "profile",
        "kv_allocation",
        "warmup",
    ]
    table = format_bench_start(runs * 2, 1)
    assert "2 fresh processes, each starting a local Ray cluster" in table
    assert all(f"  {row} " in table for row in ("python", "import", "connect", "driver_actor", "process wall"))
    twice = summarize([runs[0], {**runs[0], "import": runs[0]["import"] + 2}])
    assert twice["import"] == {"median": runs[0]["import"] + 1, "min": runs[0]["import"]}
