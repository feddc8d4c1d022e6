"""`shardlm bench`: shardlm beside transformers in one run, as ratios.

`bench load` (`driver.bench_load`): the loader beside the machine's raw read and transformers.

`bench throughput`: N prompts of random token ids, M new tokens each (greedy, no early stop),
shardlm's `LLM.generate` beside transformers' batched `generate`, output tokens per second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from driver.bench_load import bench_load, format_bench_load  # noqa: F401  (the CLI's names)


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

