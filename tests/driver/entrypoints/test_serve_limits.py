"""Serve's request limits, on an app of their own (one replica, one rank, one sequence at a
time): `max_ongoing_requests` defaults to the engine's max_num_seqs, requests beyond it queue,
and with `max_queued_requests` set a full queue answers 503 with Retry-After instead of hanging."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from driver.config.args import EngineArgs

MODEL_ID = "tiny-limits"
ENGINE = dict(
    tensor_parallel_size=1,
    device="cpu",
    max_model_len=1024,
    max_num_seqs=1,
    max_num_batched_tokens=256,
    kv_cache_memory_bytes=2**22,
)


@pytest.fixture(scope="module")
def base(ray_cluster, chat_checkpoint: Path) -> Any:
    from ray import serve

    from driver.entrypoints.serve import run_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        run_server(
            EngineArgs(model=str(chat_checkpoint), **ENGINE),
            "127.0.0.1",
            port,
            blocking=False,
            model_id=MODEL_ID,
            max_queued_requests=1,
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def open_stream(base: str, max_tokens: int) -> Any:
    body = {"model": MODEL_ID, "prompt": [1, 2, 3], "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=120)


def test_a_full_queue_is_a_503_with_retry_after_and_the_queued_request_is_served(base: str) -> None:
    running = open_stream(base, 900)  # holds the replica's one slot (max_num_seqs=1) for ~30 s
    assert running.readline().startswith(b"data: ")
    queued_events: list[bytes] = []

    def queued() -> None:
        with open_stream(base, 2) as response:
            queued_events.extend(line for line in response if line.startswith(b"data: "))

    waiting = threading.Thread(target=queued, daemon=True)
    waiting.start()
    time.sleep(1.0)  # the second request is in the proxy's queue now, its one place
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as refused:
        open_stream(base, 2)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "5"
    assert time.monotonic() - started < 10, "refused at once, not after a wait"
    assert waiting.is_alive() and not queued_events, "the queued request waits for the slot"
    running.close()  # the client leaves: its request is aborted, the slot frees
    waiting.join(60)
    assert queued_events and queued_events[-1].startswith(b"data: [DONE]")
