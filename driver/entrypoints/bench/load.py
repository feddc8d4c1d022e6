"""`shardlm bench load`: shardlm's loader beside the machine's own limits and transformers, in one run.

Each load runs in a fresh Python process (so that peak memory is its own), after the libraries
are imported, with the checkpoint's files already in the page cache. In the same run:

- **raw read**: this machine's buffered `preadv` of the same files into one reused buffer, the
  rate no loader that reads through the page cache can pass; shardlm's weights phase is shown
  as a share of it;
- **fresh read**: the same reads into memory newly allocated for them, in a fresh process: a
  loader must fault in and zero the pages its weights land in, which the raw read never does;
- **shardlm**: `Worker.load_model` for each rank (`-tp N`: N processes at once, one rank each,
  as the ranks of one node load); seconds, GB/s of the bytes each rank read, peak memory;
- **transformers**: `from_pretrained` (tp=1), seconds and peak memory after loading and after
  one forward pass (transformers maps float32 safetensors lazily: the weights become resident
  only when a forward touches them, so the second figure is the fair one);
- on CUDA, **pinned and pageable host-to-device bandwidth** and `safetensors.torch.load_file(
  device="cuda")`, the peer a CUDA load is measured against.

`engine=True` adds one whole `LLM(...)` start and its load report's phases.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROBE_TOKENS = [1, 5, 17, 42, 99, 123, 200, 255]
"""A prompt every test checkpoint's vocabulary covers."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
MiB = 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_files(model: str) -> list[Path]:
    path = Path(model)
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def warm_page_cache(model: str) -> None:
    for file in weight_files(model):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def _read_files(model: str, buffer_for: Callable[[int], memoryview]) -> dict[str, float]:
    """Buffered `preadv` of every weight file, from its start, into `buffer_for(file size)` (the
    reads wrap around a buffer shorter than the file): bytes, seconds, GB/s."""
    total, start = 0, time.perf_counter()
    for file in weight_files(model):
        size = file.stat().st_size
        buffer = buffer_for(size)
        fd = os.open(file, os.O_RDONLY)
        try:
            offset = 0
            while offset < size and (n := os.preadv(fd, [buffer[offset % len(buffer) :]], offset)) > 0:
                offset += n
            total += offset
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def raw_read(model: str, buffer_bytes: int = 64 * MiB) -> dict[str, float]:
    """Buffered `preadv` of every weight file into one reused buffer."""
    buffer = memoryview(mmap.mmap(-1, buffer_bytes))
    return _read_files(model, lambda size: buffer)


def fresh_read(model: str) -> dict[str, float]:
    """Buffered `preadv` of every weight file into memory allocated for it (in a fresh process):
    what landing the weights in new memory costs, page faults and zeroing included."""
    import torch

    return _read_files(model, lambda size: memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B"))


# -- the children ------------------------------------------------------------------------------


def _child_shardlm(model: str, dtype: str, tp_size: int, rank: int, strategy: str) -> dict[str, Any]:
    import torch

    import workers.worker  # noqa: F401  (what a rank has imported before it loads)
    from driver.config.args import EngineArgs
    from parallel.state import TensorParallelGroup
    from workers.loader import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = EngineArgs(
        model=model,
        dtype=dtype,
        device=device,
        tensor_parallel_size=tp_size,
        safetensors_load_strategy=strategy,
    ).create_engine_config()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
    start = time.perf_counter()
    loaded, report = load_model(config, TensorParallelGroup(rank=rank, size=tp_size), torch.device(device))
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "bytes_read": report.bytes_read,
        "gb_per_s": report.bytes_read / seconds / 1e9,
        "peak_after_load": _peak_rss(),
        "strategy": report.load_strategy,
        "threads": report.load_threads,
        "reads": report.reads,
        "rank": rank,
    }
    if tp_size == 1:
        from workers.models.layers import AttentionMetadata

        with torch.inference_mode():
            ids = torch.tensor(PROBE_TOKENS, device=device)
            loaded(ids, torch.arange(len(ids), device=device), AttentionMetadata(seq_lens=(len(ids),)))
        result["peak_after_forward"] = _peak_rss()
    return result


def _child_transformers(model: str, dtype: str) -> dict[str, Any]:
    import torch

    from driver.entrypoints.bench.throughput import _load_transformers_model

    start = time.perf_counter()
    hf = _load_transformers_model(model, dtype)
    seconds = time.perf_counter() - start
    after_load = _peak_rss()
    with torch.no_grad():
        hf(torch.tensor([PROBE_TOKENS]))
    return {"seconds": seconds, "peak_after_load": after_load, "peak_after_forward": _peak_rss()}


def _child_cuda(model: str) -> dict[str, Any]:
    """Pinned and pageable host-to-device bandwidth, and safetensors' own CUDA load of the files."""
    import torch
    from safetensors.torch import load_file

    nbytes = 512 * MiB
    results: dict[str, Any] = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        results[f"{kind}_h2d_gb_per_s"] = 4 * nbytes / (time.perf_counter() - start) / 1e9
        del host, dev
    files = [f for f in weight_files(model) if f.suffix == ".safetensors"]
    if files:
        start = time.perf_counter()
        loaded = [load_file(str(f), device="cuda") for f in files]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        nbytes = sum(t.numel() * t.element_size() for part in loaded for t in part.values())
        results["safetensors_cuda"] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
    return results


CHILDREN = {"shardlm": _child_shardlm, "transformers": _child_transformers, "cuda": _child_cuda, "fresh_read": fresh_read}


def _spawn(kind: str, *args: Any) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "driver.entrypoints.bench.load", kind, json.dumps(args)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(kind: str, proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} load failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_child(kind: str, *args: Any) -> dict[str, Any]:
    return _collect(kind, _spawn(kind, *args))


# -- the bench --------------------------------------------------------------------------------


def _best(previous: dict | None, result: dict) -> dict:
    """Of two runs, the faster."""
    return result if previous is None or result["seconds"] < previous["seconds"] else previous


def bench_load(
    model: str,
    dtype: str = "float32",
    repeat: int = 1,
    tensor_parallel_size: int = 1,
    strategy: str = "auto",
    engine: bool = False,
    transformers: bool = True,
) -> dict[str, Any]:
    """Best-of-`repeat` figures of each measurement, alternating within each repeat."""
    warm_page_cache(model)
    results: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size}
    for _ in range(repeat):
        results["raw_read"] = _best(results.get("raw_read"), raw_read(model))
        results["fresh_read"] = _best(results.get("fresh_read"), run_child("fresh_read", model))
        procs = [_spawn("shardlm", model, dtype, tensor_parallel_size, r, strategy) for r in range(tensor_parallel_size)]
        ranks = [_collect("shardlm", p) for p in procs]
        previous = results.get("ranks") or [None] * len(ranks)
        results["ranks"] = [_best(p, r) for p, r in zip(previous, ranks)]
        if transformers and tensor_parallel_size == 1:
            results["transformers"] = _best(results.get("transformers"), run_child("transformers", model, dtype))
    results["shardlm"] = results["ranks"][0]
    if _has_cuda():
        results["cuda"] = run_child("cuda", model)
    if engine:
        results["engine"] = engine_start_phases(model, dtype, tensor_parallel_size)
    return results


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_start_phases(model: str, dtype: str, tensor_parallel_size: int) -> dict[str, Any]:
    """One whole `LLM(...)` start: its load report's phases and each rank's weights figures."""
    from driver.entrypoints.llm import LLM

    start = time.perf_counter()
    with LLM(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, show_progress=False) as llm:
        ready = time.perf_counter() - start
        report = llm.load_report
        return {
            "ready_seconds": ready,
            "phases": dict(report.phases),
            "ranks": [
                {"rank": r.rank, "seconds": r.seconds, "gb_per_s": r.gb_per_s, "strategy": r.load_strategy} for r in report.ranks
            ],
        }


def format_bench_load(model: str, dtype: str, results: dict[str, Any]) -> str:
    raw, fresh = results["raw_read"], results["fresh_read"]
    tp = results["tensor_parallel_size"]
    lines = [
        f"load {model} ({dtype}, tensor_parallel_size={tp})",
        f"raw read (buffered preadv into a reused buffer): {raw['gb_per_s']:.2f} GB/s "
        f"({raw['bytes'] / MiB:.0f} MiB in {raw['seconds']:.3f} s)",
        f"fresh read (the same, into newly allocated memory, in a fresh process): {fresh['gb_per_s']:.2f} GB/s",
        f"{'rank':>6}{'seconds':>10}{'MiB read':>10}{'GB/s':>8}{'of raw':>8}{'of fresh':>10}  strategy (threads, reads)",
    ]
    for r in results["ranks"]:
        lines.append(
            f"{r['rank']:>6}{r['seconds']:>10.3f}{r['bytes_read'] / MiB:>10.0f}{r['gb_per_s']:>8.2f}"
            f"{r['gb_per_s'] / raw['gb_per_s']:>8.2f}{r['gb_per_s'] / fresh['gb_per_s']:>10.2f}"
            f"  {r['strategy']} ({r['threads']}, {r['reads']})"
        )
    if "transformers" in results:
        lines += _versus_transformers(results["shardlm"], results["transformers"])
    if "cuda" in results:
        lines += _cuda_lines(results["cuda"], results["shardlm"])
    if "engine" in results:
        engine = results["engine"]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in engine["phases"].items())
        lines.append(f"engine start: ready in {engine['ready_seconds']:.2f} s ({phases})")
    return "\n".join(lines)


def _versus_transformers(ours: dict, theirs: dict) -> list[str]:
    rows = [
        ("load seconds", "seconds", 1, "{:.2f}"),
        ("peak RSS after load (MiB)", "peak_after_load", MiB, "{:.0f}"),
        ("peak RSS after a forward (MiB)", "peak_after_forward", MiB, "{:.0f}"),
    ]
    lines = [f"{'':32}{'shardlm':>12}{'transformers':>14}{'ratio':>8}"]
    for label, key, scale, fmt in rows:
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        lines.append(f"{label:32}{fmt.format(ours[key] / scale):>12}{fmt.format(theirs[key] / scale):>14}{ratio:>8.2f}")
    lines.append("ratio = shardlm / transformers (below 1: shardlm is faster or smaller)")
    return lines


def _cuda_lines(cuda: dict, ours: dict) -> list[str]:
    pinned = cuda["pinned_h2d_gb_per_s"]
    lines = [
        f"host-to-device: pinned {pinned:.1f} GB/s, pageable {cuda['pageable_h2d_gb_per_s']:.1f} GB/s; "
        f"shardlm weights phase {ours['gb_per_s']:.1f} GB/s = {ours['gb_per_s'] / pinned:.2f} of pinned"
    ]
    if "safetensors_cuda" in cuda:
        peer = cuda["safetensors_cuda"]
        lines.append(f"safetensors.torch.load_file(device='cuda'): {peer['gb_per_s']:.1f} GB/s ({peer['seconds']:.2f} s)")
    return lines


if __name__ == "__main__":
    print(json.dumps(CHILDREN[sys.argv[1]](*json.loads(sys.argv[2]))))
