"""`shardlm serve` from start to SIGTERM, as a user runs it, its output captured in a file: a
request during the start gets a bounded answer, the log has the engine's bars, its load report
and the URL line, and no colour code, traceback or line per request; a dropped stream leaves at
most one INFO line; SIGTERM drains (a stream in flight finishes, a new request is a 503) and then
ends every process the command started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from driver.entrypoints.serve import RETRY_AFTER_S, START_WAIT_S

SHARDLM = str(Path(sys.executable).with_name("shardlm"))
SMALL_ENGINE = ["--max-model-len", "256", "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(16 * 2**20)]
MODEL = "SmolLM2-135M-Instruct"
START_S = 240
"""The most the start may take on a busy two-core machine."""
DRAIN_TOKENS = 150
"""The stream in flight at SIGTERM: long enough (5 to 20 s here) to see the drain's 503 meanwhile, short
enough to finish within the 30 s grace period."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, timeout_s: float = 60) -> tuple[int | None, dict, float]:
    """(status, headers, seconds taken); status None when nothing listens yet."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}, time.monotonic() - started
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, time.monotonic() - started
    except (ConnectionError, urllib.error.URLError):
        return None, {}, time.monotonic() - started


def wait_ready(base: str, server: subprocess.Popen, log: Path) -> tuple[int, dict, float] | None:
    """Poll /health until the engine is up; the answer to a completion sent while it said "starting"."""
    early = None
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"serve exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        status, _, _ = call(f"{base}/health", timeout_s=30)
        if status == 200 and "shardlm: serving" in log.read_text():
            return early
        if status == 503 and early is None:
            early = call(f"{base}/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        time.sleep(0.5)
    pytest.fail(f"serve was not ready within {START_S} s:\n{log.read_text()[-3000:]}")


def stream_completion(base: str, max_tokens: int, first: threading.Event, events: list[dict]) -> None:
    """A streamed greedy completion of `max_tokens` tokens, its events appended as they come;
    `first` is set at the first one."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                first.set()
            elif line.startswith(b"data: [DONE]"):
                events.append({"done": True})


def drop_a_stream(base: str) -> None:
    """Open a long stream, read its first event, and hang up."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        response.readline()


def drain_at_sigterm(base: str, server: subprocess.Popen) -> None:
    """SIGTERM while a stream is in flight: new requests get 503 meanwhile, and the stream ends
    normally with every token it asked for."""
    first, events = threading.Event(), []
    streaming = threading.Thread(target=stream_completion, args=(base, DRAIN_TOKENS, first, events), daemon=True)
    streaming.start()
    assert first.wait(60), "the stream's first event"
    server.send_signal(signal.SIGTERM)
    deadline, status = time.monotonic() + 20, None
    while time.monotonic() < deadline and status != 503:
        status, headers, _ = call(f"{base}/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1}, timeout_s=10)
        time.sleep(0.1)
    assert status == 503 and "retry-after" in headers, "a new request while draining"
    assert streaming.is_alive(), f"the stream ended before the drain was seen ({len(events)} events): raise DRAIN_TOKENS"
    streaming.join(120)
    assert events and events[-1] == {"done": True}, events[-3:]
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c.get("finish_reason")]
    assert finishes == ["length"] and sum(1 for e in events[:-1] for c in e["choices"] if c["text"]) >= DRAIN_TOKENS - 5


def test_serve_starts_answers_and_ends_quietly_at_sigterm(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TQDM_DISABLE")}  # the bars go in the log too
    command = [SHARDLM, "serve", "--device", "cpu", "--port", str(port), *SMALL_ENGINE]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base, started = f"http://127.0.0.1:{port}", []
    try:
        early = wait_ready(base, server, log)
        if early is not None:  # the engine was still starting: a 503 with Retry-After, or the answer, in bounded time
            status, headers, seconds = early
            assert status == 200 or (status == 503 and headers.get("retry-after") == str(RETRY_AFTER_S)), early
            assert seconds < START_WAIT_S + 20
        for route, body in (
            ("/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
            ("/v1/models", None),
        ):
            assert call(f"{base}{route}", body)[0] == 200, route
        drop_a_stream(base)
        started = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert len(started) > 5, "the command's cluster: GCS, raylet, agents, Serve's actors, the engine's rank"
        drain_at_sigterm(base, server)
        assert server.wait(60) == 0
        _, alive = psutil.wait_procs(started, timeout=10)
        assert alive == [], f"left after SIGTERM: {[(p.pid, p.name()) for p in alive]}"
    finally:
        for process in [server.pid, *(p.pid for p in started)]:
            try:
                os.kill(process, signal.SIGKILL)
            except OSError:
                pass
    text = log.read_text(errors="replace")
    assert "\x1b[" not in text, "a colour code"
    for noise in ("Traceback", "SIGTERM received", "graceful_shutdown", "POST /v1/completions"):
        assert noise not in text, f"{noise!r} in the log:\n{text[-3000:]}"
    assert not re.search(r"INFO (?!\d\d:\d\d:\d\d shardlm\.)", text), f"an INFO line of Ray's:\n{text[-3000:]}"
    assert text.count("Token authentication") <= 1, "Ray's notice, once for the cluster started"
    assert text.count("dropped its stream") <= 1, "the dropped stream: one INFO line at most"
    assert "shardlm: draining: waiting up to 30 s for requests in flight" in text
    assert "Loading weights: 100%" in text and "engine start: " in text
    assert f"shardlm: serving {MODEL!r} at {base}/v1 (Ctrl-C to stop)" in text


def test_a_dropped_clients_cancelled_receive_is_not_logged() -> None:
    """Ray Serve's receive task of a dropped stream ends as a TaskCancelledError that asyncio
    reports as "Future exception was never retrieved", with a traceback: the replica drops that
    record (it already logs the drop once), and nothing else."""
    import logging

    from ray.exceptions import TaskCancelledError

    from driver.entrypoints.serve import _dropped_client_future

    try:
        raise TaskCancelledError("the request's receive task")
    except TaskCancelledError:
        error = sys.exc_info()
    message = "Future exception was never retrieved\nfuture: <Future finished exception=TaskCancelledError()>"
    assert not _dropped_client_future(logging.LogRecord("asyncio", logging.ERROR, "", 0, message, None, error))
    assert _dropped_client_future(
        logging.LogRecord("asyncio", logging.ERROR, "", 0, "Task exception was never retrieved", None, None)
    )
