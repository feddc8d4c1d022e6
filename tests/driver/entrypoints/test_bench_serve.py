"""`shardlm bench serve` against a fake OpenAI server (aiohttp, in a thread): counts, timings,
concurrency, arrival rate, the API key, failures, and the JSON and table it prints."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web

from driver.entrypoints.bench.serve import (
    TOKEN_ID_RANGE,
    ServeBench,
    arrival_times,
    base_url,
    format_bench_serve,
    make_prompts,
    run_client,
)
from driver.entrypoints.cli import build_parser, main

MODEL = "fake-model"


@dataclass
class FakeServer:
    """Streams `max_tokens` one-word chunks, `delay_s` apart, then usage and [DONE]."""

    url: str = ""
    delay_s: float = 0.005
    api_key: str | None = None
    error_after: int | None = None
    """Send an error event after this many chunks instead of finishing."""
    active: int = 0
    peak: int = 0
    auth: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def refused(self, request: web.Request) -> web.Response | None:
        self.auth.append(request.headers.get("Authorization"))
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return web.json_response({"error": {"message": "Incorrect or missing API key", "code": "invalid_api_key"}}, status=401)

    async def models(self, request: web.Request) -> web.Response:
        return self.refused(request) or web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        refused = self.refused(request)
        if refused is not None:
            return refused
        body = await request.json()
        self.bodies.append(body)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self.stream(request, body)
        finally:
            self.active -= 1

    async def stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chat = "messages" in body
        if chat:  # as shardlm's server: the role chunk goes out before any token
            await send(response, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(self.delay_s)
            if i == self.error_after:
                await send(response, {"error": {"message": "boom", "type": "server_error"}})
                break
            finish = "length" if i == n - 1 else None
            choice = {"delta": {"content": " w"}} if chat else {"text": " w"}
            await send(response, {"choices": [{"index": 0, **choice, "finish_reason": finish}]})
        else:
            prompt = body["messages"][0]["content"].split() if chat else body["prompt"]
            await send(response, {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n}})
        await response.write(b"data: [DONE]\n\n")
        return response


async def send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.complete)
    app.router.add_post("/v1/chat/completions", server.complete)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def bench_for(server: FakeServer, **kwargs: Any) -> ServeBench:
    defaults = {"url": server.url, "model": MODEL, "num_prompts": 6, "input_len": 7, "output_len": 5}
    return ServeBench(**{**defaults, **kwargs})


def test_every_request_succeeds_and_counts_its_tokens(fake: FakeServer) -> None:
    fake.delay_s = 0.01
    result = run_client(bench_for(fake))
    assert (result["successes"], result["failures"], result["errors"]) == (6, 0, [])
    assert result["total_output_tokens"] == 6 * 5 and result["total_input_tokens"] == 6 * 7
    assert len(fake.bodies) == 7 and fake.bodies[0]["max_tokens"] == 4  # the warm-up, then the timed ones
    body = fake.bodies[1]
    assert body["model"] == MODEL and body["stream"] and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True}
    assert len(body["prompt"]) == 7 and all(TOKEN_ID_RANGE[0] <= t < TOKEN_ID_RANGE[1] for t in body["prompt"])
    ttft, tpot, e2e = result["ttft_ms"], result["tpot_ms"], result["e2e_ms"]
    assert 0 < ttft["mean"] <= e2e["mean"] and ttft["p99"] <= e2e["p99"]
    assert ttft["p50"] >= 8  # the first chunk comes after one 10 ms sleep
    assert 8 <= tpot["p50"] <= 50  # one chunk every 10 ms
    assert ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    assert result["request_throughput"] == pytest.approx(6 / result["duration_s"])
    assert result["output_throughput"] == pytest.approx(30 / result["duration_s"])


def test_chat_ttft_waits_for_content_not_the_role_chunk(fake: FakeServer) -> None:
    fake.delay_s = 0.03
    result = run_client(bench_for(fake, endpoint="chat", num_prompts=2, output_len=2))
    assert result["successes"] == 2 and result["total_output_tokens"] == 4
    assert result["ttft_ms"]["mean"] >= 25
    assert len(fake.bodies[1]["messages"][0]["content"].split()) == 7


def test_max_concurrency_bounds_the_streams_in_flight(fake: FakeServer) -> None:
    fake.delay_s = 0.01
    assert run_client(bench_for(fake, num_prompts=8, max_concurrency=2))["successes"] == 8
    assert fake.peak == 2
    fake.peak = 0
    run_client(bench_for(fake, num_prompts=8))
    assert fake.peak == 8  # no bound: all at once


def test_a_finite_rate_spreads_the_arrivals(fake: FakeServer) -> None:
    bench = bench_for(fake, num_prompts=8, output_len=2, request_rate=40.0, bench_seed=3)
    result = run_client(bench)
    last = arrival_times(8, 40.0, 3)[-1]
    assert last > 0 and last <= result["duration_s"] < last + 1.0
    assert result["request_rate"] == 40.0


def test_arrival_times_are_seeded_poisson_gaps() -> None:
    assert arrival_times(3, math.inf, 0) == [0.0, 0.0, 0.0]
    times = arrival_times(4000, 20.0, 1)
    assert times == arrival_times(4000, 20.0, 1) and times[0] == 0.0
    assert times[-1] / 3999 == pytest.approx(1 / 20.0, rel=0.1)


def test_the_api_key_reaches_the_server_and_a_wrong_one_fails_the_requests(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.api_key = "secret"
    result = run_client(bench_for(fake, model=None, api_key="secret", num_prompts=2))
    assert result["successes"] == 2 and result["model"] == MODEL  # found through GET /v1/models
    assert set(fake.auth) == {"Bearer secret"}
    monkeypatch.setenv("SHARDLM_API_KEY", "secret")
    assert run_client(bench_for(fake, num_prompts=1))["successes"] == 1
    monkeypatch.delenv("SHARDLM_API_KEY")
    result = run_client(bench_for(fake, api_key="wrong", num_prompts=3))
    assert (result["successes"], result["failures"]) == (0, 3)
    assert result["errors"] == ["HTTP 401: Incorrect or missing API key"]
    with pytest.raises(ValueError, match="cannot list the models.*HTTP 401"):
        run_client(bench_for(fake, model=None, num_prompts=1))


def test_an_error_event_in_the_stream_fails_the_request(fake: FakeServer) -> None:
    fake.error_after = 2
    result = run_client(bench_for(fake, num_prompts=3))
    assert (result["successes"], result["failures"], result["errors"]) == (0, 3, ["boom"])
    assert result["ttft_ms"]["mean"] is None and result["total_output_tokens"] == 0


def test_a_timeout_and_a_dead_server_fail_the_requests(fake: FakeServer) -> None:
    fake.delay_s = 0.2
    result = run_client(bench_for(fake, num_prompts=2, timeout_s=0.05))
    assert result["failures"] == 2 and result["errors"] == ["timed out after 0.05 s"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    result = run_client(replace(bench_for(fake, num_prompts=2), url=f"http://127.0.0.1:{port}"))
    assert result["failures"] == 2 and "ClientConnectorError" in result["errors"][0]


def test_the_result_is_strict_json_and_formats_as_vllm_does(fake: FakeServer) -> None:
    result = run_client(bench_for(fake, num_prompts=2))
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["request_rate"] == "inf" and result["max_concurrency"] is None
    table = format_bench_serve(result)
    for line in (
        "============ Serving Benchmark Result ============",
        "Successful requests:                    2",
        "Failed requests:                        0",
        "Benchmark duration (s):",
        "Request throughput (req/s):",
        "Output token throughput (tok/s):",
        "Mean TTFT (ms):",
        "P99 TTFT (ms):",
        "P50 TPOT (ms):",
        "P90 E2E (ms):",
    ):
        assert line in table
    fake.error_after = 0
    failed = run_client(bench_for(fake, num_prompts=1))
    json.dumps(failed, allow_nan=False)
    assert "Mean TTFT (ms):                         -" in format_bench_serve(failed) and "error: boom" in format_bench_serve(
        failed
    )


def test_urls_prompts_and_bad_settings() -> None:
    assert {base_url(u) for u in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/")} == {"http://h:1"}
    bench = ServeBench(num_prompts=3, input_len=4)
    assert make_prompts(bench) == make_prompts(bench) != make_prompts(replace(bench, bench_seed=1))
    assert make_prompts(replace(bench, prompt="hi")) == ["hi"] * 3
    assert all(isinstance(p, str) and len(p.split()) == 4 for p in make_prompts(replace(bench, endpoint="chat")))
    for bad in ({"endpoint": "embed"}, {"num_prompts": 0}, {"request_rate": 0.0}, {"max_concurrency": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            replace(bench, **bad).validate()


def test_the_cli_parses_and_runs_against_a_url(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    ns = build_parser().parse_args(
        ["bench", "serve", "--url", "http://x", "--num-prompts", "3", "--max-concurrency", "2", "--json"]
    )
    assert (ns.command, ns.bench_command, ns.url, ns.num_prompts, ns.max_concurrency, ns.json) == (
        "bench",
        "serve",
        "http://x",
        3,
        2,
        True,
    )
    assert math.isinf(ns.request_rate) and ns.endpoint == "completions" and ns.port == 8000
    argv = ["bench", "serve", "--url", fake.url + "/v1", "--num-prompts", "2", "--output-len", "3", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["successes"] == 2 and result["model"] == MODEL and result["total_output_tokens"] == 6
    fake.error_after = 0
    assert main(argv) == 1  # a failed request
    capsys.readouterr()
    assert main([*argv, "--model", "m"]) == 2
    assert "--model would be ignored" in capsys.readouterr().err
