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

from driver.config.args import EngineArgs
from driver.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from driver.entrypoints.async_engine import AsyncEngine
from driver.entrypoints.openai_api import OpenAIServing, error_response
from parallel.errors import ConfigError, EngineAsleepError, EngineDeadError
from workers.faults import FAULTS_ENV

MODEL_ID = "tiny-chat"
API_KEY = "test-key"
MAX_MODEL_LEN = 1024
ENGINE = dict(
    tensor_parallel_size=2, device="cpu", max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=256, kv_cache_memory_bytes=2**22
)
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


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
    faults = pytest.MonkeyPatch()
    faults.setenv(FAULTS_ENV, "1")  # forwarded to the replica and its ranks: requests may ask to fail
    try:
        handle = run_server(
            EngineArgs(model=str(chat_checkpoint), **ENGINE),
            "127.0.0.1",
            port,
            blocking=False,
            model_id=MODEL_ID,
            api_key=API_KEY,
        )
        yield f"http://127.0.0.1:{port}", handle, groups_before
    finally:
        faults.undo()
        serve.shutdown()


def _live_groups() -> dict[str, list[dict]]:
    """Placement group id -> its bundles, for the groups in place now."""
    from ray.util import placement_group_table

    return {
        g["placement_group_id"]: list(g["bundles"].values()) for g in placement_group_table().values() if g["state"] == "CREATED"
    }


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(url: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
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
    with pytest.raises(openai.BadRequestError, match="unknown field `beam_width`"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, extra_body={"beam_width": 2})
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


def test_a_stream_is_counted_in_flight_until_it_ends_or_is_never_started() -> None:
    """The drain waits for the in-flight count: a stream ends its count once, whether it runs to
    its end or its client leaves before it starts (then the response is only collected)."""
    import gc

    from driver.entrypoints.serve import OpenAIServer

    closed = []

    async def chunks():
        try:
            yield b"data: 1\n\n"
        finally:
            closed.append(True)

    replica = object.__new__(OpenAIServer.func_or_class)
    replica.in_flight = 2
    never_started = replica._streamed(chunks())
    del never_started
    gc.collect()
    assert replica.in_flight == 1

    async def drain(response) -> list[bytes]:
        return [chunk async for chunk in response.body_iterator]

    response = replica._streamed(chunks())
    assert asyncio.run(drain(response)) == [b"data: 1\n\n"] and closed == [True]
    del response
    gc.collect()
    assert replica.in_flight == 0  # once, not again when collected


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


def test_a_prompt_and_max_tokens_past_max_model_len_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_ID, prompt=[1] * 1000, max_tokens=100)
    message = caught.value.body["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message and "you requested 1100 tokens" in message
    assert "(1000 in the prompt, 100 in the completion)" in message
    with pytest.raises(openai.BadRequestError, match="in the messages"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=MAX_MODEL_LEN)
    assert client.completions.create(model=MODEL_ID, prompt=[1] * 1000, max_tokens=24).usage.completion_tokens == 24


def test_the_api_key_is_asked_for_on_v1_only(server: Any) -> None:
    body = json.dumps({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1}).encode()
    for key in (None, "wrong"):
        status, reply = post(f"{server[0]}/v1/completions", body, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    bare = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bare.models.list()
    assert post(f"{server[0]}/v1/completions", body)[0] == 200
    with urllib.request.urlopen(f"{server[0]}/health", timeout=30) as response:
        assert response.status == 200


def test_a_body_past_the_limit_is_a_413(server: Any) -> None:
    from driver.entrypoints.serve import MAX_BODY_BYTES

    body = json.dumps({"model": MODEL_ID, "prompt": "x" * (MAX_BODY_BYTES + 1)}).encode()
    status, reply = post(f"{server[0]}/v1/completions", body)
    assert status == 413 and "longer than this server takes" in reply["error"]["message"]


def test_vllm_request_fields_have_their_effects(client: openai.OpenAI, tokenizer: Any) -> None:
    eos, forced = tokenizer.eos_token_id, 300

    def complete(**extra: Any) -> Any:
        max_tokens = extra.pop("max_tokens", 6)
        return client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body=extra)

    ends = complete(logit_bias={str(eos): 100}).choices[0]  # the end of sequence, at once
    assert ends.finish_reason == "stop" and ends.text == ""
    assert complete(logit_bias={str(eos): 100}, skip_special_tokens=False).choices[0].text == tokenizer.eos_token
    kept = complete(logit_bias={str(eos): 100}, ignore_eos=True)
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 6
    late = complete(logit_bias={str(eos): 100}, min_tokens=3)
    assert late.choices[0].finish_reason == "stop" and late.usage.completion_tokens == 4
    stopped = complete(logit_bias={str(forced): 100}, stop_token_ids=[forced], min_tokens=2)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 3  # two, then the stop token
    piece = tokenizer.decode([forced])
    with_stop = complete(logit_bias={str(forced): 100}, stop=[piece], include_stop_str_in_output=True).choices[0]
    assert with_stop.finish_reason == "stop" and with_stop.text == piece
    assert complete(logit_bias={str(forced): 100}, stop=[piece]).choices[0].text == ""
    assert complete(spaces_between_special_tokens=False).choices[0].text == complete().choices[0].text

    plain = complete(max_tokens=16).choices[0].text
    penalized = complete(max_tokens=16, repetition_penalty=1.8).choices[0].text
    assert penalized != plain

    echoed = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text.startswith(PROMPT) and choice.text[len(PROMPT) :] == complete(max_tokens=3).choices[0].text
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    assert len(choice.logprobs.tokens) == prompt_tokens + 3 and choice.logprobs.token_logprobs[0] is None
    assert all(lp is not None for lp in choice.logprobs.token_logprobs[1:])

    best = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4, n=2, best_of=4, seed=3)
    assert len(best.choices) == 2 and best.usage.completion_tokens == 16 and best.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="best_of \\(1\\) must be at least n \\(2\\)"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, n=2, best_of=1)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        complete(logit_bias={"10000000": 1})


def test_a_request_level_failure_ends_that_request_alone(client: openai.OpenAI) -> None:
    """One request's sampling fails on rank 0 (made to, through vllm_xargs), while 20 others
    batched with it finish with the text each gives alone; a detokenization failure of another
    reaches its stream as an error event; the engine serves on."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"{i} little pigs went to" for i in range(20)]

    def complete(prompt: str) -> str:
        return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0).choices[0].text

    def failing() -> Exception | None:
        try:
            client.completions.create(
                model=MODEL_ID, prompt=PROMPT, max_tokens=5, extra_body={"vllm_xargs": {"shardlm_fault": "sample"}}
            )
        except Exception as exc:
            return exc
        return None

    alone = [complete(p) for p in prompts[:3]]
    with ThreadPoolExecutor(21) as pool:
        failed = pool.submit(failing)
        together = list(pool.map(complete, prompts))
    error = failed.result()
    assert isinstance(error, openai.InternalServerError) and "sampling failed" in str(error)
    assert error.body["code"] == "request_failed"
    assert together[:3] == alone and all(together)

    stream = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=5, stream=True, extra_body={"vllm_xargs": {"shardlm_fault": "detokenize"}}
    )
    with pytest.raises(openai.APIError, match="its output failed: InjectedFault"):
        list(stream)
    assert complete(prompts[0]) == alone[0]


def test_metrics_add_up_to_the_requests_usage(client: openai.OpenAI, server: Any) -> None:
    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"{server[0]}/metrics", timeout=30) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("shardlm:") and "_bucket" not in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    usages = [
        client.completions.create(model=MODEL_ID, prompt=p, max_tokens=k, temperature=0).usage
        for p, k in (("One", 3), ("Two and three", 5), (PROMPT, 2))
    ]
    after = scrape()
    label = f'{{model_name="{MODEL_ID}"}}'
    added = {name: after[name] - before.get(name, 0.0) for name in after}
    assert added[f"shardlm:prompt_tokens_total{label}"] == sum(u.prompt_tokens for u in usages)
    assert added[f"shardlm:generation_tokens_total{label}"] == sum(u.completion_tokens for u in usages)
    assert added[f"shardlm:e2e_request_latency_seconds_count{label}"] == 3
    assert added[f"shardlm:time_to_first_token_seconds_count{label}"] == 3
    assert added[f'shardlm:request_success_total{{model_name="{MODEL_ID}",finished_reason="length"}}'] == 3
    assert after[f"shardlm:num_requests_running{label}"] == 0 and 0 <= after[f"shardlm:kv_cache_usage_perc{label}"] <= 1
    for name in ("num_requests_waiting", "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total"):
        assert f"shardlm:{name}{label}" in after


# -- the async front alone, on a fake engine -----------------------------------------------------


class FakeEngine:
    """One token per request per step; `fail_at_step` makes a step raise as a dead worker does."""

    config = None

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.requests, self.steps, self.fail_at_step = {}, 0, fail_at_step
        self.limits: dict[str, int] = {}
        self.aborted: list[str] = []

    def add_requests(self, requests: list[tuple], length_field: str | None = None) -> None:
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


class StalledEngine(FakeEngine):
    """Requests it can never schedule: each step returns nothing and says what blocks them."""

    blocked: str | None = None

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        self.blocked = "request 'big' waits for KV blocks for 30 tokens, and 4 of the pool's blocks are free"
        return []

    def abort(self, request_ids: list[str]) -> None:
        super().abort(request_ids)
        self.blocked = None


def test_a_blocked_engine_waits_instead_of_spinning(caplog: pytest.LogCaptureFixture) -> None:
    """With requests left but none schedulable, the loop steps once, says why (one WARNING),
    and waits for a command; an abort frees it."""
    from workers.sampling_params import SamplingParams

    fake = StalledEngine()
    front = AsyncEngine(fake)

    async def scenario() -> None:
        stream = await front.submit([(None, [1])], SamplingParams(max_tokens=4))
        await asyncio.sleep(0.5)
        assert fake.steps <= 2, f"{fake.steps} steps in 0.5 s: it spins"
        stream.close()
        await asyncio.sleep(0.2)

    try:
        with caplog.at_level("WARNING", logger="shardlm"):
            asyncio.run(scenario())
    finally:
        front.shutdown()
    assert fake.aborted and not fake.requests
    stalls = [r for r in caplog.records if "the engine waits for a request or an abort" in r.getMessage()]
    assert len(stalls) == 1 and "4 of the pool's blocks are free" in stalls[0].getMessage()


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


# -- last: it kills a rank of the module's app ----------------------------------------------------


def test_a_killed_rank_gives_every_request_in_flight_an_error(client: openai.OpenAI, server: Any) -> None:
    """Streams already under way get an error event, a whole answer in wait gets a 503 (engine
    dead), none of them a normal finish; /health then reports the dead engine, so that Serve
    replaces the replica."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    started = threading.Barrier(4)

    def stream() -> str:
        chunks = client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        try:
            for i, chunk in enumerate(chunks):
                if i == 0:
                    started.wait(60)
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    return f"finished: {chunk.choices[0].finish_reason}"
        except openai.APIError as exc:
            return f"error: {exc.message}"
        return "ended without a finish or an error"

    def whole() -> str:
        try:
            out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=900, extra_body={"ignore_eos": True})
            return f"finished: {out.choices[0].finish_reason}"
        except openai.APIStatusError as exc:
            return f"{exc.status_code}: {exc.message}"

    ranks = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::WorkerActor")]
    assert len(ranks) == 2, ranks  # the app's two ranks, by their process titles
    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(stream) for _ in range(3)]
        wholes = [pool.submit(whole) for _ in range(2)]
        started.wait(60)  # every stream under way
        ranks[1].send_signal(signal.SIGKILL)
        answers = [f.result(timeout=120) for f in streams + wholes]
    assert all(a.startswith("error: ") and "died" in a for a in answers[:3]), answers
    assert all(a.startswith("503: ") and "died" in a for a in answers[3:]), answers
    status, body = call_health(server[0])
    assert status == 503 and "died" in json.dumps(body), body


def call_health(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
