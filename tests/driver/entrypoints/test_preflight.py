"""Mistakes refused before Ray starts: a max_model_len longer than the model's config allows, and
device="cuda" on a machine with no GPU, read without torch, with the engine's own messages."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driver.config.model_config import derived_max_model_len, load_hf_config, model_arch, resolve_max_model_len
from driver.entrypoints import preflight
from parallel.errors import ConfigError
from tests.helpers import FAMILIES, hf_config
from workers.gguf_file import read_gguf_index
from workers.model_files import ModelFiles

SHARDLM = Path(sys.executable).with_name("shardlm")
NO_GPU = not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/dxg")


def config_only(folder: Path, **config: object) -> ModelFiles:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_config("llama")
    for key, value in config.items():
        setattr(cfg, key, value)
    cfg.save_pretrained(folder)
    return ModelFiles(source="folder", folder=str(folder), weight_format="dummy")


def engine_limit(files: ModelFiles) -> int:
    cfg = load_hf_config(files)
    return derived_max_model_len(cfg, model_arch(cfg, files))


def test_the_plain_reading_agrees_with_the_engines(tmp_path: Path, smollm2_gguf: Path) -> None:
    cases = []
    for family in FAMILIES:
        hf = hf_config(family)
        hf.architectures = [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[hf.model_type]
        ]
        hf.save_pretrained(tmp_path / family)
        cases.append(ModelFiles(source="folder", folder=str(tmp_path / family), weight_format="dummy"))
    cases.append(
        config_only(
            tmp_path / "windowed",
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            use_sliding_window=True,
            sliding_window=100,
        )
    )
    cases.append(ModelFiles(source="gguf", folder=str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, weight_format="gguf"))
    for files in cases:
        assert preflight.config_max_len(files) == engine_limit(files), files.folder


def test_the_gguf_scalars_are_those_of_the_engines_index(smollm2_gguf: Path) -> None:
    from workers.gguf_metadata import read_gguf_scalars

    scalars = read_gguf_scalars(str(smollm2_gguf))
    metadata = read_gguf_index(str(smollm2_gguf)).metadata
    assert all(metadata[key] == value for key, value in scalars.items())
    assert {"general.architecture", "llama.context_length", "tokenizer.ggml.model"} <= set(scalars)
    assert not any(isinstance(metadata[key], list) for key in scalars)  # arrays are stepped over


def test_the_messages_are_the_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = config_only(tmp_path / "m")
    limit = engine_limit(files)
    with pytest.raises(ConfigError) as theirs:
        cfg = load_hf_config(files)
        resolve_max_model_len(cfg, model_arch(cfg, files), limit + 1)
    with pytest.raises(ConfigError) as ours:
        preflight.check_max_model_len(files, limit + 1)
    assert str(ours.value) == str(theirs.value) and ours.value.field == "max_model_len"
    preflight.check_max_model_len(files, limit)

    import torch

    from driver.config.args import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as theirs:
        resolve_device("cuda")
    with pytest.raises(ConfigError) as ours:
        preflight.check_device("cuda", None)
    assert str(ours.value) == str(theirs.value) and ours.value.field == "device"
    preflight.check_device("cuda", "ray://head:10001")  # a remote cluster's GPUs are not this machine's
    preflight.check_device("cpu", None)


def refused(*flags: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    done = subprocess.run([str(SHARDLM), "generate", *flags], capture_output=True, text=True, timeout=60, env=env)
    return done, time.perf_counter() - started


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max-model-len", "999999"], "is larger than the model allows (8192"),
        pytest.param(
            ["--device", "cuda"],
            "was asked for, but torch sees no CUDA",
            marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU"),
        ),
    ],
)
def test_the_command_refuses_before_ray_starts(flags: list[str], expected: str) -> None:
    done, seconds = refused(*flags)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and done.stderr.startswith("shardlm: error: ")
    assert "Ray" not in done.stderr, done.stderr  # neither "starting a local Ray cluster" nor Ray's own lines
    assert seconds < 4.0, f"refused in {seconds:.1f} s"
