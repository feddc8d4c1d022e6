"""`shardlm serve` from start to SIGTERM, as a user runs it, its output captured in a file: a
request during the start gets a bounded answer, the log has the engine's bars, its load report
and the URL line, and no colour code, traceback or line per request; SIGTERM ends every process
the command started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
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
        started = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert len(started) > 5, "the command's cluster: GCS, raylet, agents, Serve's actors, the engine's rank"
        server.send_signal(signal.SIGTERM)
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
    assert "Loading weights: 100%" in text and "engine start: " in text
    assert f"shardlm: serving {MODEL!r} at {base}/v1 (Ctrl-C to stop)" in text
