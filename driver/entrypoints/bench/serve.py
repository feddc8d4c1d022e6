"""`shardlm bench serve`: an online serving benchmark through the OpenAI API, as `vllm bench serve`.

N streamed requests go to /v1/completions (or /v1/chat/completions) of a running server, or of
one started here, all at once or at a Poisson rate, optionally at most `max_concurrency` in
flight. Per request it measures, from the moment the request is sent:

- TTFT: until the first chunk that carries text (or a finish reason);
- E2E: until the stream's last byte;
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests of more than one output token.

Output tokens are the usage chunk's `completion_tokens` (the requests ask for it), else the
number of chunks that carried text. The run's duration runs from the first send to the last
request's end; throughputs divide by it. A non-200 answer, an `error` event in the stream, a
timeout or a broken connection fails that request: its message is kept and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

API_KEY_ENV = "SHARDLM_API_KEY"
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
TOKEN_ID_RANGE = (10, 10_000)
"""Random prompt ids are drawn from here: above most special tokens, inside any real vocabulary."""
WORDS = (
    "the of and to in is was for on are with as be at by this had not but from or have an they which one you were all we "
    "her she there would their will when who him been has more if no out so said what up its about into than them can only"
).split()
"""The words random chat prompts are made of (about one token each in common tokenizers)."""
WARMUP_TOKENS = 4
MAX_ERRORS = 5
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class ServeBench:
    """What `shardlm bench serve` sends, and where."""

    url: str | None = None
    """The server's base URL (http://host:port, with or without /v1); None: start one here."""
    endpoint: str = "completions"
    """"completions" (/v1/completions) or "chat" (/v1/chat/completions)."""
    model: str | None = None
    """The model name the requests carry; None: the first of GET /v1/models. With a server
    started here, also the name it serves under."""
    num_prompts: int = 64
    """Requests to send (after one warm-up request, not counted)."""
    input_len: int = 32
    """Prompt length: token ids for completions; words (about as many tokens) for chat."""
    output_len: int = 64
    """New tokens per request (`max_tokens`, with `ignore_eos`)."""
    request_rate: float = math.inf
    """Requests per second, as Poisson arrivals (exponential gaps, mean 1 / rate); inf: all at once."""
    max_concurrency: int | None = None
    """The most requests in flight at once; None: no bound."""
    prompt: str | None = None
    """One prompt text for every request instead of random ones (a prefix cache will hit on it)."""
    bench_seed: int = 0
    """Seed of the random prompts and of the arrival gaps."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer KEY`; None: SHARDLM_API_KEY, else no key."""
    timeout_s: float = 600.0
    """The most seconds one request may take, stream included."""
    port: int = 8000
    """The port of the server started here (url None)."""

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint={self.endpoint!r}: give one of {', '.join(ENDPOINTS)}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate} must be positive (inf: all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency} must be at least 1")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be positive")


@dataclass
class RequestResult:
    """One request's outcome; the times are seconds from its send."""

    ok: bool = False
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def base_url(url: str) -> str:
    """http://host:port from http://host:port, http://host:port/ or http://host:port/v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def make_prompts(bench: ServeBench) -> list[str | list[int]]:
    """`num_prompts` prompts: the fixed text, else random ids (completions) or words (chat)."""
    if bench.prompt is not None:
        return [bench.prompt] * bench.num_prompts
    rng = random.Random(bench.bench_seed)
    if bench.endpoint == "chat":
        return [" ".join(rng.choice(WORDS) for _ in range(bench.input_len)) for _ in range(bench.num_prompts)]
    return [[rng.randrange(*TOKEN_ID_RANGE) for _ in range(bench.input_len)] for _ in range(bench.num_prompts)]


def request_body(bench: ServeBench, model: str, prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if bench.endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": prompt}]}
    return {**body, "prompt": prompt}


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of `n` requests is due: the first at 0, then
    exponential gaps of mean 1 / rate (all 0 when rate is inf)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(n - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times


def headers_for(bench: ServeBench) -> dict[str, str]:
    key = bench.api_key if bench.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_message(status: int, text: str) -> str:
    """`HTTP 401: <the error's message>` from an error answer's body (OpenAI's {"error": ...})."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {status}: {message or text.strip()[:200] or 'no body'}"


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-events stream, up to `data: [DONE]`."""
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[len(b"data:") :].strip()
            if payload == b"[DONE]":
                return
            yield json.loads(payload)


def chunk_text(event: dict[str, Any]) -> tuple[str, bool]:
    """The text of an event's first choice (chat's opening role chunk has none), and whether
    that choice is finished."""
    choices = event.get("choices") or []
    if not choices:
        return "", False
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
    return text or "", choice.get("finish_reason") is not None


async def read_stream(response: aiohttp.ClientResponse, start: float) -> RequestResult:
    result, chunks = RequestResult(), 0
    async for event in sse_events(response):
        if "error" in event:
            error = event["error"]
            result.error = str(error.get("message") if isinstance(error, dict) else error)
            break
        text, finished = chunk_text(event)
        chunks += bool(text)
        if result.ttft_s is None and (text or finished):
            result.ttft_s = time.perf_counter() - start
        usage = event.get("usage")
        if usage:
            result.output_tokens = usage.get("completion_tokens", 0)
            result.prompt_tokens = usage.get("prompt_tokens", 0)
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = result.error is None
    return result


async def send_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], bench: ServeBench) -> RequestResult:
    """POST one streamed request; every failure becomes a failed result with its message."""
    start = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=bench.timeout_s)
        async with session.post(url, json=body, headers=headers_for(bench), timeout=timeout) as response:
            if response.status != 200:
                message = error_message(response.status, await response.text())
                return RequestResult(e2e_s=time.perf_counter() - start, error=message)
            return await read_stream(response, start)
    except asyncio.TimeoutError:
        return RequestResult(e2e_s=time.perf_counter() - start, error=f"timed out after {bench.timeout_s:g} s")
    except (aiohttp.ClientError, ValueError) as exc:
        return RequestResult(e2e_s=time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")


async def served_model(session: aiohttp.ClientSession, base: str, bench: ServeBench) -> str:
    """The first model id of GET /v1/models."""
    try:
        async with session.get(f"{base}/v1/models", headers=headers_for(bench)) as response:
            text = await response.text()
            if response.status != 200:
                raise ValueError(error_message(response.status, text))
            models = json.loads(text).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ValueError(f"cannot list the models at {base}/v1/models: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"cannot list the models at {base}/v1/models: {exc}") from exc
    if not models:
        raise ValueError(f"{base}/v1/models lists no model")
    return models[0]["id"]


async def run_requests(bench: ServeBench, base: str) -> dict[str, Any]:
    """The warm-up request, then the timed ones; the summary of the timed ones."""
    prompts = make_prompts(bench)
    url = base + ENDPOINTS[bench.endpoint]
    limit = asyncio.Semaphore(bench.max_concurrency or bench.num_prompts)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:  # aiohttp's default: 100
        model = bench.model or await served_model(session, base, bench)
        await send_request(session, url, request_body(bench, model, prompts[0], min(WARMUP_TOKENS, bench.output_len)), bench)
        start = time.perf_counter()

        async def one(prompt: str | list[int], due: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            async with limit:
                return await send_request(session, url, request_body(bench, model, prompt, bench.output_len), bench)

        due = arrival_times(bench.num_prompts, bench.request_rate, bench.bench_seed)
        results = await asyncio.gather(*(one(p, t) for p, t in zip(prompts, due)))
        duration = time.perf_counter() - start
    return summarize(bench, base, model, list(results), duration)


def stats_ms(seconds: list[float]) -> dict[str, float | None]:
    """Mean and percentiles (linear interpolation) in ms; None where there is nothing to measure."""
    if not seconds:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(seconds) * 1000.0
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(bench: ServeBench, base: str, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The run's figures, JSON-safe (`json.dumps(..., allow_nan=False)` takes it; an infinite
    request rate is the string "inf")."""
    done = [r for r in results if r.ok]
    errors = list(dict.fromkeys(r.error for r in results if r.error is not None))[:MAX_ERRORS]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: None)
    return {
        "url": base,
        "endpoint": bench.endpoint,
        "model": model,
        "num_prompts": bench.num_prompts,
        "successes": len(done),
        "failures": len(results) - len(done),
        "errors": errors,
        "duration_s": duration,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "max_concurrency": bench.max_concurrency,
        "request_rate": "inf" if math.isinf(bench.request_rate) else bench.request_rate,
        "ttft_ms": stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": stats_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "e2e_ms": stats_ms([r.e2e_s for r in done]),
    }


def run_client(bench: ServeBench, base: str | None = None) -> dict[str, Any]:
    """The benchmark against the server at `base` (default: bench.url)."""
    bench.validate()
    return asyncio.run(run_requests(bench, base_url(base or bench.url or "")))


def bench_serve(bench: ServeBench, engine_args: dict[str, Any] | None = None, show_progress: bool = False) -> dict[str, Any]:
    """The benchmark against bench.url, or, when it is None, against a server started here on
    127.0.0.1:bench.port with `engine_args` (stopped afterwards, whatever happens)."""
    bench.validate()
    if bench.url is not None:
        return run_client(bench)
    from driver.config.args import EngineArgs
    from driver.entrypoints.serve import run_server, stop_serving

    try:
        run_server(
            EngineArgs(**(engine_args or {})),
            host="127.0.0.1",
            port=bench.port,
            blocking=False,
            model_id=bench.model,
            show_progress=show_progress,
            api_key=bench.api_key,
        )
        return run_client(bench, f"http://127.0.0.1:{bench.port}")
    finally:
        stop_serving()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_bench_serve(result: dict[str, Any]) -> str:
    """The result as `vllm bench serve` prints it."""

    def row(name: str, value: Any) -> str:
        return f"{name:<40}{value}"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    concurrency = result["max_concurrency"] if result["max_concurrency"] is not None else "unbounded"
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        row("Endpoint:", f"{result['url']} ({result['endpoint']})"),
        row("Model:", result["model"]),
        row("Successful requests:", result["successes"]),
        row("Failed requests:", result["failures"]),
        row("Maximum request concurrency:", concurrency),
        row("Request rate (req/s):", result["request_rate"]),
        row("Benchmark duration (s):", f"{result['duration_s']:.2f}"),
        row("Total input tokens:", result["total_input_tokens"]),
        row("Total generated tokens:", result["total_output_tokens"]),
        row("Request throughput (req/s):", rate(result["request_throughput"])),
        row("Output token throughput (tok/s):", rate(result["output_throughput"])),
        row("Total token throughput (tok/s):", rate(result["total_token_throughput"])),
    ]
    for key, title, name in (
        ("ttft_ms", "Time to First Token", "TTFT"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("e2e_ms", "End-to-end Latency", "E2E"),
    ):
        lines.append("{s:{c}^{n}}".format(s=f" {title} ", n=50, c="-"))
        stats = result[key]
        lines.append(row(f"Mean {name} (ms):", _ms(stats["mean"])))
        lines += [row(f"P{p} {name} (ms):", _ms(stats[f"p{p}"])) for p in PERCENTILES]
    lines.append("=" * 50)
    lines += [f"error: {message}" for message in result["errors"]]
    return "\n".join(lines)
