"""Quiet by default: `-q` prints the results alone, Ray's token notice is shardlm's INFO record,
Ray's and Ray Serve's levels follow --debug, and SIGTERM becomes a KeyboardInterrupt that the
command's cleanup sees. One engine start, through the `shardlm` command; the rest in-process."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster import connect
from cluster.logs import COLOR_ENV, ROOT, log_to_stderr, ray_level

SHARDLM = str(Path(sys.executable).with_name("shardlm"))
SMALL_ENGINE = ["--max-model-len", "256", "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(16 * 2**20)]
SHARDLM_RECORD = re.compile(r"^(WARNING|ERROR|CRITICAL) \d\d:\d\d:\d\d shardlm\.")


def test_quiet_generate_prints_its_results_and_no_line_of_ray() -> None:
    """On this machine Ray's token notice is due (~/.ray/auth_token, RAY_AUTH_MODE unset): not under -q."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TQDM_DISABLE")}
    done = subprocess.run(
        [SHARDLM, "generate", "--max-tokens", "4", "--temperature", "0", "-q", "--device", "cpu", *SMALL_ENGINE, "Hi"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("'Hi' -> ") and len(done.stdout.splitlines()) == 1, done.stdout
    strangers = [line for line in done.stderr.splitlines() if not SHARDLM_RECORD.match(line)]
    assert strangers == [], done.stderr


def test_token_notice_is_passed_on_once_as_info_or_dropped(caplog: pytest.LogCaptureFixture) -> None:
    ray_logger = logging.getLogger(connect.TOKEN_AUTH_LOGGER)
    caplog.set_level(logging.INFO, logger=ROOT)
    logging.getLogger(ROOT).propagate = True
    with connect._token_notice(show=True):
        ray_logger.warning("Token authentication is enabled for this Ray cluster.")
        ray_logger.warning("Token authentication is enabled for this Ray cluster.")
    with connect._token_notice(show=False):
        ray_logger.warning("Token authentication is enabled for the cluster joined.")
    records = [r for r in caplog.records if "Token authentication" in r.getMessage()]
    assert [(r.name, r.levelno, r.getMessage()) for r in records] == [
        ("shardlm.cluster.connect", logging.INFO, "Ray: Token authentication is enabled for this Ray cluster.")
    ]
    assert ray_logger.filters == []


def test_ray_levels_follow_debug_and_colour_needs_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    from driver.entrypoints.serve import serve_logging

    monkeypatch.delenv(COLOR_ENV, raising=False)
    with log_to_stderr(logging.INFO):
        assert ray_level() == logging.WARNING and logging.getLogger("ray.serve").level == logging.WARNING
        assert serve_logging() == {"log_level": "WARNING", "enable_access_log": False, "encoding": "TEXT"}
        assert os.environ[COLOR_ENV] == "0", "pytest's streams are not terminals"
    assert COLOR_ENV not in os.environ
    with log_to_stderr(logging.DEBUG):
        assert ray_level() == logging.INFO and serve_logging()["enable_access_log"]


def test_sigterm_raises_terminated_in_the_main_thread_and_a_second_one_is_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    previous = connect._catch_sigterm(before)
    try:
        assert previous is before
        with pytest.raises(connect.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert isinstance(connect.Terminated(), KeyboardInterrupt)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_what_outlives_the_grace_is_killed() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "pass"])
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    )
    processes = [psutil.Process(polite.pid), psutil.Process(stubborn.pid)]
    polite.wait(30)
    started = time.monotonic()
    connect._end(processes, grace_s=0.5)
    assert time.monotonic() - started < 5 and not processes[1].is_running()
    assert processes[1].returncode == -signal.SIGKILL  # reaped by _end's wait
