"""Shared fixtures: checkpoints written by the tests, the real SmolLM2 model and its reference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, interpreted

from tests.helpers import (  # noqa: E402
    SMOLLM2_PROMPTS,
    convert_gguf_to_safetensors,
    hf_model,
    transformers_greedy,
    write_checkpoint,
)


@pytest.fixture(scope="session", autouse=True)
def shardlm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep shardlm's cache (converted GGUF tokenizers) out of the user's home."""
    path = tmp_path_factory.mktemp("shardlm-cache")
    os.environ["SHARDLM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Path, Any]]:
    """(family, format) -> (checkpoint folder, the transformers model it holds); each made once."""
    made: dict[tuple[str, str], tuple[Path, Any]] = {}

    def make(family: str, fmt: str = "safetensors") -> tuple[Path, Any]:
        if (family, fmt) not in made:
            model = hf_model(family)
            folder = write_checkpoint(model, tmp_path_factory.mktemp(f"{family}-{fmt}"), fmt)
            made[family, fmt] = (folder, model)
        return made[family, fmt]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from workers.model_files import default_model_path

    return default_model_path()


def reference_cache(gguf: Path) -> Path:
    """Where transformers' references for the SmolLM2 file are kept between runs (about 30 s to
    compute): SHARDLM_TEST_CACHE, else ~/.cache/shardlm-test-references, keyed by the file's contents
    and the transformers and torch versions that computed them."""
    import hashlib

    import transformers

    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()  # the file's contents: every venv's copy is the same
    key = f"{digest}:{transformers.__version__}:{torch.__version__}"
    root = Path(os.environ.get("SHARDLM_TEST_CACHE") or Path.home() / ".cache" / "shardlm-test-references")
    return root / hashlib.sha256(key.encode()).hexdigest()[:20]


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> tuple[Path, Any]:
    """(safetensors folder converted from the GGUF file, transformers' float32 model of the GGUF
    file). transformers converts the file once; later runs load its saved conversion."""
    from transformers import AutoModelForCausalLM

    folder = reference_cache(smollm2_gguf) / "safetensors"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    building = folder.with_name(f"safetensors.{os.getpid()}")
    hf = convert_gguf_to_safetensors(smollm2_gguf, building)
    if not folder.exists():
        building.rename(folder)  # whole or not at all
    return folder, hf


@pytest.fixture(scope="session")
def smollm2_greedy_references(smollm2_reference: tuple[Path, Any], smollm2_gguf: Path) -> list[list[int]]:
    """transformers' greedy tokens (16, no stop) for each of SMOLLM2_PROMPTS alone, float32."""
    import hashlib
    import json

    from driver.config.args import EngineArgs
    from driver.engine.tokenizer import load_tokenizer

    kept = (
        reference_cache(smollm2_gguf) / f"greedy-16-{hashlib.sha256(json.dumps(SMOLLM2_PROMPTS).encode()).hexdigest()[:12]}.json"
    )
    if kept.is_file():
        return json.loads(kept.read_text())
    tokenizer = load_tokenizer(EngineArgs(model=str(smollm2_gguf)).create_engine_config().model)
    refs = [transformers_greedy(smollm2_reference[1], tokenizer(p)["input_ids"], 16) for p in SMOLLM2_PROMPTS]
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.with_suffix(f".{os.getpid()}").write_text(json.dumps(refs))
    kept.with_suffix(f".{os.getpid()}").rename(kept)
    return refs


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, with logical CPUs for four CPU ranks and the driver."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def hub(monkeypatch):
    """A Hub stand-in on the loopback address (tests/hub_server.py), HF_ENDPOINT pointing at it,
    online, with this process's memory of unreachable Hubs and warnings said cleared."""
    from tests.hub_server import HubServer
    from workers import hub as hub_module

    monkeypatch.setattr(hub_module, "_unreachable", {})
    monkeypatch.setattr(hub_module, "_warned", set())
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        yield server
