"""`shardlm bench load`: shardlm's loader beside transformers' `from_pretrained`, in one run.

Each load runs in a fresh Python process (so that peak memory is its own), after both libraries
are imported, with the checkpoint's files already in the page cache (both read them warm). A
child reports: seconds from the load call until the model is ready, peak resident memory after
loading, and peak resident memory after one forward pass over a short prompt. The last is the
fair memory figure: transformers maps float32 safetensors lazily, so its weights become resident
only when a forward pass first touches them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ("shardlm", "transformers")
PROBE_TOKENS = [1, 5, 17, 42, 99, 123, 200, 255]
"""A prompt every test checkpoint's vocabulary covers."""


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_shardlm(model: str, dtype: str) -> Any:
    from driver.args import EngineArgs
    from workers.worker import Worker

    worker = Worker(EngineArgs(model=model, dtype=dtype, device="cpu").create_engine_config())
    worker.load_model()
    return lambda ids: worker.prompt_logits([ids])[0]


def _load_transformers(model: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    kwargs: dict[str, Any] = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()

    def forward(ids: list[int]) -> Any:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0]

    return forward


def child(impl: str, model: str, dtype: str) -> dict[str, float]:
    """One measured load (runs in its own process)."""
    import torch  # noqa: F401  (imported before timing, as transformers' own import is)
    import transformers  # noqa: F401

    import driver.args  # noqa: F401
    import workers.worker  # noqa: F401

    start = time.perf_counter()
    forward = _load_shardlm(model, dtype) if impl == "shardlm" else _load_transformers(model, dtype)
    seconds = time.perf_counter() - start
    after_load = _peak_rss()
    forward(PROBE_TOKENS)
    return {"seconds": seconds, "peak_after_load": after_load, "peak_after_forward": _peak_rss()}


def _warm_page_cache(model: str) -> None:
    path = Path(model)
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    for file in files:
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def run_child(impl: str, model: str, dtype: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "driver.bench", impl, model, dtype]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {impl} load failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_load(model: str, dtype: str = "float32", repeat: int = 1) -> dict[str, dict[str, float]]:
    """Best-of-`repeat` figures for each implementation, loads alternating."""
    _warm_page_cache(model)
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for impl in IMPLEMENTATIONS:
            result = run_child(impl, model, dtype)
            previous = best.get(impl)
            best[impl] = result if previous is None else {k: min(v, previous[k]) for k, v in result.items()}
    return best


def format_bench_load(model: str, dtype: str, results: dict[str, dict[str, float]]) -> str:
    mib = 2**20
    ours, theirs = results["shardlm"], results["transformers"]
    rows = [
        ("load seconds", "seconds", 1, "{:.2f}"),
        ("peak RSS after load (MiB)", "peak_after_load", mib, "{:.0f}"),
        ("peak RSS after a forward (MiB)", "peak_after_forward", mib, "{:.0f}"),
    ]
    lines = [f"load {model} ({dtype}, CPU)", f"{'':32}{'shardlm':>12}{'transformers':>14}{'ratio':>8}"]
    for label, key, scale, fmt in rows:
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        lines.append(f"{label:32}{fmt.format(ours[key] / scale):>12}{fmt.format(theirs[key] / scale):>14}{ratio:>8.2f}")
    lines.append("ratio = shardlm / transformers (below 1: shardlm is faster or smaller)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
