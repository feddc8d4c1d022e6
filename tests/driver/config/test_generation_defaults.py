"""Sampling defaults from the model's generation_config.json: read, ignored with
generation_config="vllm", overridden by what a request sets, in `LLM` and the OpenAI routes."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from driver.config.args import EngineArgs
from driver.config.generation_defaults import GenerationDefaults, load_generation_defaults, sampling_params_with_defaults
from driver.entrypoints.llm import LLM
from driver.entrypoints.openai_api import OpenAIError, OpenAIServing
from parallel.errors import ConfigError
from tests.helpers import with_byte_tokenizer
from workers.sampling_params import SamplingParams

MODEL_DEFAULTS = dict(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, max_new_tokens=3)
EXPECTED = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 3}
SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=4 * 2**20, device="cpu")


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny checkpoint with a byte tokenizer and transformers' own generation_config.json."""
    from transformers import GenerationConfig

    checkpoint, _ = tiny_checkpoint("llama")
    model = with_byte_tokenizer(checkpoint, tmp_path_factory.mktemp("with-defaults") / "model")
    GenerationConfig(do_sample=True, **MODEL_DEFAULTS).save_pretrained(model)
    return model


def model_config(folder: Path) -> Any:
    return EngineArgs(model=str(folder)).create_engine_config(device="cpu").model


def test_the_model_file_gives_the_defaults_and_vllm_ignores_it(folder: Path) -> None:
    config = model_config(folder)
    defaults = load_generation_defaults("auto", config)
    assert defaults.values == EXPECTED and defaults.source == "generation_config.json"
    assert defaults.describe() == (
        "sampling defaults: temperature=0.6 top_p=0.9 top_k=20 repetition_penalty=1.1 max_tokens=3 from generation_config.json"
    )
    ignored = load_generation_defaults("vllm", config)
    assert ignored.values == {} and ignored.describe() == "sampling defaults: shardlm's (generation_config='vllm')"
    assert sampling_params_with_defaults({}, ignored) == SamplingParams()


def test_values_equal_to_transformers_defaults_are_not_the_models(folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(folder, tmp_path / "model")
    (copy / "generation_config.json").write_text(json.dumps({"top_k": 50, "temperature": 1.0, "bos_token_id": 1}))
    defaults = load_generation_defaults("auto", model_config(copy))
    assert defaults.values == {} and "sets none of" in defaults.describe()
    (copy / "generation_config.json").unlink()
    assert "has no generation_config.json" in load_generation_defaults("auto", model_config(copy)).describe()


def test_a_file_with_values_sampling_refuses_is_a_config_error(folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(folder, tmp_path / "model")
    for bad, match in (({"top_p": 0}, "top_p must be in"), ({"temperature": "hot"}, "not a number"), ("[1]", "not an object")):
        (copy / "generation_config.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(ConfigError, match=match) as caught:
            load_generation_defaults("auto", model_config(copy))
        assert "generation_config='vllm'" in str(caught.value)


def test_a_gguf_model_has_none(smollm2_gguf: Path) -> None:
    defaults = load_generation_defaults("auto", EngineArgs(model=str(smollm2_gguf)).create_engine_config(device="cpu").model)
    assert defaults.values == {} and "GGUF" in defaults.describe()


def test_what_is_set_comes_first_then_the_model_then_the_fallback() -> None:
    defaults = GenerationDefaults(values=EXPECTED, source="generation_config.json")
    params = sampling_params_with_defaults(
        {"temperature": 0.0, "top_p": None}, defaults, fallback={"max_tokens": 256, "min_p": 0.1}
    )
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens, params.min_p) == (0.0, 0.9, 20, 3, 0.1)
    assert sampling_params_with_defaults({}, GenerationDefaults(), fallback={"max_tokens": 256}).max_tokens == 256
    with pytest.raises(ValueError, match="top_k must be"):
        sampling_params_with_defaults({"top_k": -2}, defaults)


class CapturingEngine:
    """Enough of `AsyncEngine` for the routes to build a request: it keeps the SamplingParams."""

    def __init__(self) -> None:
        self.params: list[SamplingParams] = []

    async def render_chat(self, conversations: list, add_generation_prompt: bool, kwargs: Any) -> list[list[int]]:
        return [[1, 2, 3]]

    async def submit(self, prompts: list, params: SamplingParams, reply_id: str, length_field: str | None = None) -> Any:
        self.params.append(params)
        raise ValueError("captured")


def routed(defaults: GenerationDefaults, route: str, body: dict) -> SamplingParams:
    engine = CapturingEngine()
    serving = OpenAIServing(engine, "m", 64, 300, defaults=defaults)
    with pytest.raises(OpenAIError, match="captured"):
        asyncio.run(getattr(serving, route)(json.dumps({"model": "m", **body}).encode()))
    return engine.params[0]


def test_openai_requests_take_the_models_defaults_for_what_they_leave_out() -> None:
    model = GenerationDefaults(values=EXPECTED, source="generation_config.json")
    plain = routed(model, "completions", {"prompt": "Hi"})
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty, plain.max_tokens) == (0.6, 0.9, 20, 1.1, 3)
    typed = routed(model, "completions", {"prompt": "Hi", "temperature": 0, "max_tokens": 9, "top_k": -1})
    assert (typed.temperature, typed.top_p, typed.top_k, typed.max_tokens) == (0.0, 0.9, 0, 9)
    chat = routed(model, "chat", {"messages": [{"role": "user", "content": "Hi"}]})
    assert (chat.temperature, chat.max_tokens) == (0.6, 3)
    assert routed(model, "chat", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5}).max_tokens == 5
    ours = GenerationDefaults()
    assert routed(ours, "completions", {"prompt": "Hi"}).max_tokens == 16  # OpenAI's default
    assert routed(ours, "chat", {"messages": [{"role": "user", "content": "Hi"}]}).max_tokens is None  # until max_model_len
    assert routed(ours, "chat", {"messages": [{"role": "user", "content": "Hi"}]}).temperature == 1.0


def test_llm_applies_the_models_defaults_unless_given_sampling_params(ray_cluster, folder: Path) -> None:
    """One engine start: generate and chat without sampling parameters take the file's; an
    explicit SamplingParams is used as it is (vLLM's semantics); the load report says which."""
    with LLM(str(folder), **SMALL) as llm:
        defaults = llm.get_default_sampling_params()
        assert defaults == SamplingParams(**EXPECTED)
        assert llm.load_report.generation_defaults == llm.generation_defaults
        assert (
            "sampling defaults: temperature=0.6 top_p=0.9 top_k=20 repetition_penalty=1.1 max_tokens=3 from generation_config.json"
            in (llm.load_report.format())
        )
        plain, chat = llm.generate("Hello"), llm.chat([{"role": "user", "content": "Hello"}])
        for out in (plain[0].outputs[0], chat[0].outputs[0]):
            assert 1 <= len(out.token_ids) <= 3 and (len(out.token_ids) == 3) == (out.finish_reason == "length")
        given = llm.generate("Hello", SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0]
        assert len(given.token_ids) == 6
        _through_the_command(llm, folder)


def _through_the_command(llm: LLM, folder: Path) -> None:
    """`shardlm generate` on the same engine: untyped flags take the file's max_new_tokens (3),
    a typed --max-tokens overrides it."""
    import contextlib
    import io

    from driver.entrypoints import cli

    def run(*flags: str) -> list[dict]:
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setattr(cli, "open_llm", lambda ns: contextlib.nullcontext(llm))
            assert cli.main(["generate", "--model", str(folder), "--json", "-q", *flags, "Hello"]) == 0
        return json.loads(out.getvalue())["outputs"]

    by_model = run("--temperature", "0")[0]
    assert 1 <= len(by_model["token_ids"]) <= 3 and (len(by_model["token_ids"]) == 3) == (by_model["finish_reason"] == "length")
    typed = run("--temperature", "0", "--max-tokens", "7")[0]
    assert typed["token_ids"][: len(by_model["token_ids"])] == by_model["token_ids"]  # greedy: the same start
    assert len(typed["token_ids"]) == 7 or typed["finish_reason"] == "stop"
    assert len(typed["token_ids"]) > 3 or typed["finish_reason"] == "stop"
