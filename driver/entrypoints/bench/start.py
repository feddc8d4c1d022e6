"""`shardlm bench start`: what a whole engine start costs, phase by phase, over fresh processes.

Each run is a new Python process that imports shardlm, calls `LLM(...)` (which joins Ray or
starts a local cluster, then brings the engine up), shuts it down (and the cluster it started)
and exits. The child reports the seconds of each step; this process adds what only it can see:
the interpreter's start (from spawning the child until its first line runs) and the process's
whole wall time. Steps that overlap (Ray's start runs beside the imports and the discovery) are
each timed on their own, so the rows need not add up to the wall time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from parallel.errors import ShardLMError

MARKER = "SHARDLM_BENCH_START "
CHILD_TIMEOUT_S = 900.0
CHILD = """
import json, sys, time
first = time.time()
from driver import LLM
imported = time.time()
llm = LLM(**json.loads(sys.argv[1]), show_progress=False)
ready = time.time()
report = llm.load_report
llm.shutdown()
from cluster.connect import shutdown_local_cluster, started_local_cluster
local = started_local_cluster()
shutdown_local_cluster()
done = time.time()
print({marker!r} + json.dumps({{
    "first": first, "import": imported - first, "connect": report.connect_seconds, "phases": report.phases,
    "ready": sum(report.phases.values()), "llm": ready - imported, "shutdown": done - ready,
    "model": report.model, "device": llm.config.model.device, "local_cluster": local,
}}), flush=True)
"""
"""The child's program: argv[1] is the JSON of the LLM's keyword arguments."""


ROWS = {
    "python": "interpreter start, until the child's first line",
    "import": "from driver import LLM",
    "connect": "join Ray, or start a local cluster",
    "discover": "validate, find the model, read its config (beside connect)",
    "driver_actor": "the driver actor's process (the ranks' actors start beside it)",
    "workers": "the rest of the ranks' start, and their process group",
    "engine ready": "the load report's phases, summed (the 'engine ready' log line)",
    "LLM()": "LLM(...) from call to return",
    "shutdown": "llm.shutdown() and the local cluster's shutdown",
    "process wall": "spawn to exit, as this process saw it",
}
"""What each row times (the load report's phases come between connect and engine ready)."""


def run_child(engine_args: dict[str, Any], timeout_s: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Start one engine in a fresh process; its measurements, with `python` and `process wall` added."""
    spawned = time.time()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD.format(marker=MARKER), json.dumps(engine_args)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise ShardLMError(f"bench start: a child did not finish within {timeout_s:.0f} s") from None
    wall = time.time() - spawned
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise ShardLMError(f"bench start: the child failed (exit status {done.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(MARKER) :])
    result["python"] = result.pop("first") - spawned
    result["process wall"] = wall
    return result


def bench_start(engine_args: dict[str, Any], repeat: int) -> list[dict[str, Any]]:
    """`repeat` fresh starts, one after another."""
    if repeat < 1:
        raise ShardLMError(f"--repeat {repeat}: give at least 1 run")
    return [run_child(engine_args) for _ in range(repeat)]


def rows(run: dict[str, Any]) -> dict[str, float]:
    """One run's seconds, in the table's order."""
    table = {"python": run["python"], "import": run["import"], "connect": run["connect"]}
    table.update({f"  {name}": seconds for name, seconds in run["phases"].items()})
    table.update({"engine ready": run["ready"], "LLM()": run["llm"], "shutdown": run["shutdown"]})
    table["process wall"] = run["process wall"]
    return table


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per row: the median and the minimum over the runs (a row some runs lack is left out)."""
    per_run = [rows(run) for run in runs]
    names = [name for name in per_run[0] if all(name in r for r in per_run)]
    return {name: {"median": statistics.median(r[name] for r in per_run), "min": min(r[name] for r in per_run)} for name in names}


def format_bench_start(runs: list[dict[str, Any]], tensor_parallel_size: int) -> str:
    first = runs[0]
    cluster = "each starting a local Ray cluster" if first["local_cluster"] else "each joining Ray"
    lines = [
        f"shardlm bench start: {first['model']}, tp={tensor_parallel_size}, {first['device']}, "
        f"{len(runs)} fresh process{'es' if len(runs) > 1 else ''}, {cluster}",
        f"  {'phase':<16}{'median s':>10}{'min s':>10}",
    ]
    for name, stats in summarize(runs).items():
        note = ROWS.get(name.strip(), "")
        lines.append(f"  {name:<16}{stats['median']:>10.2f}{stats['min']:>10.2f}    {note}".rstrip())
    return "\n".join(lines)
