"""`shardlm bench`: shardlm beside transformers in one run, as ratios.

`bench load`: shardlm's loader beside transformers' `from_pretrained`.

Each load runs in a fresh Python process (so that peak memory is its own), after both libraries
are imported, with the checkpoint's files already in the page cache (both read them warm). A
child reports: seconds from the load call until the model is ready, peak resident memory after
loading, and peak resident memory after one forward pass over a short prompt. The last is the
fair memory figure: transformers maps float32 safetensors lazily, so its weights become resident
only when a forward pass first touches them.

`bench throughput`: N prompts of random token ids, M new tokens each (greedy, no early stop),
shardlm's `LLM.generate` beside transformers' batched `generate`, output tokens per second.
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

    hf = _load_transformers_model(model, dtype)

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



# ----------------------------------------------------------------------------------------------
# shardlm bench throughput


def random_prompts(num: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    """`num` prompts of random token ids (past the first 100, where special tokens live), lengths
    drawn uniformly from [lo, hi]."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(*lengths))] for _ in range(num)]


def run_shardlm_throughput(engine_args: dict, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    from driver.llm import LLM
    from workers.sampling_params import SamplingParams

    with LLM(**engine_args) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": seconds, "output_tokens": generated, "tokens_per_s": generated / seconds}


def run_transformers_throughput(model: str, dtype: str, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """transformers' batched greedy `generate` on the same prompts (left-padded when lengths differ),
    on the GPU where there is one, as the engine runs."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = _load_transformers_model(model, dtype).to(device)
    longest = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, pad_token_id=pad,
        )
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - longest) * len(prompts)
    return {"seconds": seconds, "output_tokens": generated, "tokens_per_s": generated / seconds}


def _load_transformers_model(model: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    kwargs: dict[str, Any] = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()


def format_throughput(setup: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    return "\n".join([
        f"throughput: {setup}",
        f"{'':28}{'shardlm':>12}{'transformers':>14}",
        f"{'output tokens':28}{ours['output_tokens']:>12.0f}{theirs['output_tokens']:>14.0f}",
        f"{'seconds':28}{ours['seconds']:>12.2f}{theirs['seconds']:>14.2f}",
        f"{'output tokens / s':28}{ours['tokens_per_s']:>12.1f}{theirs['tokens_per_s']:>14.1f}",
        f"ratio (shardlm / transformers): {ratio:.2f}",
    ])


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
