"""`ray job submit --working-dir <repo> -- python -m driver generate ...` against a head node of
its own: the packages travel in the working dir, nothing is installed on the cluster for them.

The head node runs in a session of its own (`ray start --head --block` under start_new_session),
on ports of its own and a temp dir of its own, and is stopped by ending that session's processes;
never `ray stop`, which would end every Ray cluster on the machine (the suite's included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from transformers import AutoTokenizer

from tests.helpers import greedy_ids, with_byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_env() -> dict[str, str]:
    """This process's environment for the head node and the client: no token auth (this machine
    has ~/.ray/auth_token), the venv's `python` first on PATH, progress bars on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TQDM_DISABLE")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the head node's dashboard did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


def end_session(head: subprocess.Popen) -> None:
    """End every process of the head node's session (workers have process groups of their own
    inside it) and its descendants: SIGTERM, then SIGKILL for what is left."""
    session = head.pid
    ours = {p.pid for p in psutil.Process(head.pid).children(recursive=True)} if head.poll() is None else set()
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == session:
                ours.add(pid)
        except OSError:
            continue
    ours.add(head.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        _, alive = psutil.wait_procs([p for p in map(_process, ours) if p is not None], timeout=1)
        ours = {p.pid for p in alive}
        if not ours:
            break
    head.wait(timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture
def head_node() -> Iterator[tuple[str, Path]]:
    """(the dashboard's URL, the head node's temp dir)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="shardlm-ray-", dir="/tmp"))  # short: socket paths have a limit
    ports = free_ports(len(PORT_FLAGS))
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "4",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    command += [str(x) for flag, port in zip(PORT_FLAGS, ports) for x in (flag, port)]
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(command, env=cluster_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports[1]}"
        wait_for_dashboard(url, head, log)
        yield url, temp_dir
    finally:
        end_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_generate_runs_as_a_ray_job_from_the_working_dir(head_node, tiny_checkpoint, tmp_path) -> None:
    url, temp_dir = head_node
    checkpoint, hf = tiny_checkpoint("llama")
    model = with_byte_tokenizer(checkpoint, tmp_path / "model")
    generate = [
        "python",
        "-m",
        "driver",
        "generate",
        "--model",
        str(model),
        "-tp",
        "2",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--max-num-batched-tokens",
        "256",
        "--kv-cache-memory-bytes",
        str(4 * 2**20),
        "--json",
        "Hello",
    ]
    done = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", ".", "--", *generate],
        cwd=REPO,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"load_report"')))
    assert len(result["load_report"]["ranks"]) == 2
    token_ids = result["outputs"][0]["token_ids"]
    prompt = AutoTokenizer.from_pretrained(model)("Hello")["input_ids"]
    assert token_ids and token_ids == greedy_ids(hf, prompt, 4)[: len(token_ids)]
    assert "Loading weights: 100%" in done.stdout  # the bars, drawn by the job's driver process

    shipped = [d for d in temp_dir.glob("session_*/runtime_resources/working_dir_files/*") if d.is_dir()]
    assert shipped and all((d / "driver" / "entrypoints" / "cli.py").is_file() for d in shipped)
    assert not any((d / name).exists() for d in shipped for name in (".git", ".venv", ".whl"))
