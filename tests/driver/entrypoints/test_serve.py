"""The OpenAI-compatible Ray Serve app, through the official `openai` client.

One app serves every test of the module: a tiny random Llama at tensor_parallel_size=2 that
carries SmolLM2's tokenizer and chat template (its text is noise, but greedy noise is
reproducible, which is what streaming must match). The async front is also tested alone, on a
fake engine, for what a live engine cannot be made to do on demand (die).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from driver.config.args import EngineArgs
from driver.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from driver.entrypoints.async_engine import AsyncEngine
from driver.entrypoints.openai_api import OpenAIServing, error_response
from parallel.errors import ConfigError, EngineAsleepError, EngineDeadError
from tests.helpers import hf_config

MODEL_ID = "tiny-chat"
MAX_MODEL_LEN = 1024
ENGINE = dict(
    tensor_parallel_size=2, device="cpu", max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=256, kv_cache_memory_bytes=2**22
)
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> Any:
    from driver.engine.tokenizer import load_tokenizer

    return load_tokenizer(EngineArgs(model=str(smollm2_gguf)).create_engine_config(device="cpu").model)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny Llama (8 heads, 4 KV heads: splits in two) over SmolLM2's vocabulary, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    config = hf_config("llama_8h4kv")
    config.vocab_size, config.max_position_embeddings = len(tokenizer), MAX_MODEL_LEN
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-chat")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(ray_cluster, chat_checkpoint: Path) -> Any:
    """(base URL, the app's handle, the placement groups there were before): Serve on a free port
    of 127.0.0.1, shut down after the module."""
    from ray import serve

    from driver.entrypoints.serve import run_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups_before = set(_live_groups())
    handle = run_server(EngineArgs(model=str(chat_checkpoint), **ENGINE), "127.0.0.1", port, blocking=False, model_id=MODEL_ID)
    try:
        yield f"http://127.0.0.1:{port}", handle, groups_before
    finally:
        serve.shutdown()


def _live_groups() -> dict[str, list[dict]]:
    """Placement group id -> its bundles, for the groups in place now."""
    from ray.util import placement_group_table

    return {
        g["placement_group_id"]: list(g["bundles"].values()) for g in placement_group_table().values() if g["state"] == "CREATED"
    }


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=120)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- through HTTP --------------------------------------------------------------------------------


def test_completion_whole_and_streamed(client: openai.OpenAI, tokenizer: Any) -> None:
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.text and whole.object == "text_completion"
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        prompt_tokens,
        8,
        prompt_tokens + 8,
    )

    chunks = list(
        client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_whole_and_streamed(client: openai.OpenAI, tokenizer: Any) -> None:
    whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content and whole.choices[0].finish_reason == "length"
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert whole.usage.completion_tokens == 8

    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_stop_n_seed_and_logprobs(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]

    sampled = client.completions.create(model=MODEL_ID, prompt=[PROMPT, "Hi"], max_tokens=4, n=2, seed=7, logprobs=2)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3] and sampled.usage.completion_tokens == 16
    lp = sampled.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    again = client.completions.create(model=MODEL_ID, prompt=[PROMPT, "Hi"], max_tokens=4, n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]

    chat = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(step.top_logprobs) == 2 and step.logprob <= 0 for step in content)


def test_concurrent_requests_match_each_alone(client: openai.OpenAI) -> None:
    """Requests batched together, half of them streamed, give each one's text alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["Once upon a time", "1, 2, 3,", "def f(x):", PROMPT]

    def complete(prompt: str, stream: bool) -> str:
        reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    alone = [complete(p, False) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts, [False, True] * 2))
    assert together == alone


def test_models_and_health(client: openai.OpenAI, server: Any) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID] and models[0].max_model_len == MAX_MODEL_LEN
    with urllib.request.urlopen(f"{server[0]}/health", timeout=30) as response:
        assert response.status == 200


def test_errors(client: openai.OpenAI, server: Any) -> None:
    status, body = post(f"{server[0]}/v1/completions", b'{"model": "tiny-chat", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(f"{server[0]}/v1/chat/completions", json.dumps({"messages": MESSAGES}).encode())
    assert status == 400 and "missing required field `model`" in body["error"]["message"] and body["error"]["param"] == "model"

    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1") as caught:
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="got `str` - at `\\$.temperature`"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="unknown field `best_of`"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, extra_body={"best_of": 2})
    with pytest.raises(openai.NotFoundError, match=f"The model `gpt-4` does not exist; this server serves `{MODEL_ID}`"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="stop_token_ids must be below the vocabulary size, 49152"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, extra_body={"stop_token_ids": [10**6], "min_tokens": 1})
    with pytest.raises(openai.BadRequestError, match="Expected `int` <= 9223372036854775807 - at `\\$.seed`"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, seed=2**64)
    with pytest.raises(openai.BadRequestError, match=f"has 1201 tokens, and max_model_len is {MAX_MODEL_LEN}"):
        client.completions.create(model=MODEL_ID, prompt=[1] * 1201, max_tokens=1)


def test_a_dropped_stream_is_aborted(client: openai.OpenAI, server: Any) -> None:
    handle = server[1]
    before = handle.stats.remote().result()
    stream = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=900, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # ~30 s of generation left when it is dropped
    deadline = time.monotonic() + 15
    while (stats := handle.stats.remote().result())["running"] + stats["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (stats["running"], stats["waiting"], stats["free_blocks"]) == (0, 0, before["free_blocks"])


def test_the_replica_group_holds_the_ranks(server: Any) -> None:
    """One new placement group (Serve's, for the replica): bundle 0 for the replica, then the two
    ranks, which the engine placed there rather than in a group of its own."""
    new = [bundles for group, bundles in _live_groups().items() if group not in server[2]]
    assert new == [[{"CPU": 1.0}] * 3]


def test_build_app_checks_its_arguments(chat_checkpoint: Path) -> None:
    from ray.serve import Application

    from driver.entrypoints.serve import app, build_app

    assert isinstance(app, Application)
    assert isinstance(build_app({"model": str(chat_checkpoint), "tensor_parallel_size": "2", "model_id": "x"}), Application)
    with pytest.raises(ConfigError, match="unknown argument 'tensor_paralel_size'; did you mean 'tensor_parallel_size'"):
        build_app({"model": str(chat_checkpoint), "tensor_paralel_size": "2"})
    with pytest.raises(ConfigError, match="unknown engine argument 'max_num_seq'; did you mean 'max_num_seqs'"):
        build_app({"model_loading_config": {"model_source": str(chat_checkpoint)}, "engine_kwargs": {"max_num_seq": 8}})
    with pytest.raises(ConfigError, match="must be divisible by tensor parallel size"):
        build_app({"model": str(chat_checkpoint), "tensor_parallel_size": "3"})
    with pytest.raises(ConfigError, match="num_replicas"):
        build_app({"model": str(chat_checkpoint), "num_replicas": "0"})


def test_serve_command_flags() -> None:
    from driver.entrypoints.cli import build_parser

    ns = build_parser().parse_args(["serve"])
    assert (ns.host, ns.port, ns.model, ns.served_model_name, ns.num_replicas) == ("127.0.0.1", 8000, None, None, 1)
    ns = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "-tp", "2", "--served-model-name", "m"])
    assert (ns.host, ns.port, ns.tensor_parallel_size, ns.served_model_name) == ("0.0.0.0", 9000, 2, "m")


# -- the async front alone, on a fake engine -----------------------------------------------------


class FakeEngine:
    """One token per request per step; `fail_at_step` makes a step raise as a dead worker does."""

    config = None

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.requests, self.steps, self.fail_at_step = {}, 0, fail_at_step
        self.limits: dict[str, int] = {}
        self.aborted: list[str] = []

    def add_requests(self, requests: list[tuple]) -> None:
        if any(not token_ids for _, _, token_ids, _ in requests):
            raise ValueError("prompt is empty")  # and none is queued, as the engine does
        for request_id, _, _, params in requests:
            self.requests[request_id], self.limits[request_id] = [], params.max_tokens

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise EngineDeadError("the engine stopped: rank 1 died during execute_model")
        time.sleep(0.001)
        outputs = []
        for request_id, tokens in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) == self.limits[request_id]
            outputs.append(_output(request_id, tokens, done))
            if done:
                del self.requests[request_id]
        return outputs

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


def _output(request_id: str, tokens: list[int], done: bool) -> RequestOutput:
    text = "".join(f"<{t}>" for t in tokens)
    completion = CompletionOutput(index=0, text=text, token_ids=list(tokens), finish_reason="length" if done else None)
    return RequestOutput(
        request_id=request_id,
        prompt=None,
        prompt_token_ids=[1],
        outputs=[completion],
        finished=done,
        metrics=RequestMetrics(arrival_time=0.0),
    )


def test_concurrent_requests_stream_and_a_closed_stream_is_aborted() -> None:
    from workers.sampling_params import SamplingParams

    fake = FakeEngine()
    front = AsyncEngine(fake)

    async def whole(max_tokens: int) -> str:
        stream = await front.submit([(None, [1])], SamplingParams(max_tokens=max_tokens))
        return [out async for out in stream][-1].outputs[0].text

    async def scenario() -> tuple[list[str], list[str]]:
        texts = await asyncio.gather(whole(3), whole(5), whole(1))
        with pytest.raises(ValueError, match="prompt is empty"):
            await front.submit([(None, [1]), (None, [])], SamplingParams())
        dropped = await front.submit([(None, [1])], SamplingParams(max_tokens=10_000))
        await dropped.__anext__()
        dropped.close()
        await front.call(lambda: None)  # runs after the abort: the engine thread takes commands in order
        return texts, dropped.request_ids

    try:
        texts, dropped_ids = asyncio.run(scenario())
    finally:
        front.shutdown()
    assert texts == ["<0><1><2>", "<0><1><2><3><4>", "<0>"]
    assert fake.aborted == dropped_ids and not fake.requests


def test_a_dead_engine_fails_requests_in_flight_and_later() -> None:
    from workers.sampling_params import SamplingParams

    front = AsyncEngine(FakeEngine(fail_at_step=3))
    serving = OpenAIServing(front, "m", 64, 100)

    async def scenario() -> None:
        stream = await front.submit([(None, [1])], SamplingParams(max_tokens=100))
        with pytest.raises(EngineDeadError, match="rank 1 died"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await front.submit([(None, [1])], SamplingParams())
        with pytest.raises(EngineDeadError) as caught:
            await serving.completions(b'{"model": "m", "prompt": [1, 2]}')
        status, body = error_response(caught.value)
        assert status == 503 and "rank 1 died" in body["error"]["message"]

    try:
        asyncio.run(scenario())
        with pytest.raises(EngineDeadError):
            front.check_health()
    finally:
        front.shutdown()


def test_sleep_routes_are_off_unless_dev_mode(server: Any) -> None:
    for route in ("/sleep?level=1", "/wake_up"):
        status, body = post(f"{server[0]}{route}", b"")
        assert status == 404 and "SHARDLM_SERVER_DEV_MODE=1" in body["error"]["message"]
    status, body = error_response(EngineAsleepError("the engine is asleep (sleep level 1): call wake_up() first"))
    assert status == 503 and body["error"]["code"] == "engine_asleep"


class SlowStart(FakeEngine):
    """An engine whose start waits for `go`, then returns a report or raises `error`."""

    def __init__(self, error: BaseException | None = None) -> None:
        super().__init__()
        self.go, self.error, self.phase = threading.Event(), error, "weights"

    def start(self, placement_timeout_s: float) -> str:
        self.go.wait(30)
        if self.error is not None:
            raise self.error
        self.phase = "ready"
        return "report"


def test_a_starting_engine_answers_within_a_bound_then_serves_or_says_why_it_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import driver.entrypoints.async_engine as async_engine
    from driver.entrypoints.async_engine import StartingEngine
    from driver.entrypoints.serve import RETRY_AFTER_S, _error, _Starting

    engines = [SlowStart(), SlowStart(ConfigError("no room for the KV cache"))]
    monkeypatch.setattr(async_engine, "build_engine", lambda args, strategy: engines.pop(0))

    async def scenario(starting: StartingEngine, fake: SlowStart) -> AsyncEngine | None:
        began = time.monotonic()
        assert await starting.wait(0.2) is None and time.monotonic() - began < 5
        assert starting.phase == "weights" and not starting.done
        fake.go.set()
        return await starting.wait(30)

    fine, failing = engines
    starting = StartingEngine(EngineArgs())
    try:
        engine = asyncio.run(scenario(starting, fine))
        assert engine is starting.engine and engine.load_report == "report" and starting.done
    finally:
        starting.shutdown()
    with pytest.raises(EngineDeadError, match="the engine failed to start: ConfigError: no room for the KV cache"):
        asyncio.run(scenario(StartingEngine(EngineArgs()), failing))

    response = _error(_Starting("the engine is starting (weights); retry in 5 s"))
    assert response.status_code == 503 and response.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert json.loads(response.body)["error"]["code"] == "engine_starting"
