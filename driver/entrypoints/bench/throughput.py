"""`shardlm bench`: shardlm beside transformers in one run, as ratios.

`bench load` (`driver.entrypoints.bench.load`): the loader beside the machine's raw read and transformers.

`bench throughput`: N prompts of random token ids, M new tokens each (greedy, no early stop),
shardlm's `LLM.generate` beside transformers' batched `generate`, output tokens per second.
With `--mixed`, each request draws its prompt length and its output length: shardlm serves
each to its own length; transformers runs them as one padded batch to the longest output.
Both count only the tokens requested (the sum of the requests' own lengths).

`bench latency` (`driver.entrypoints.bench.latency`): ms per decode step at given batch sizes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from driver.entrypoints.bench.load import bench_load, format_bench_load  # noqa: F401  (the CLI's names)


def random_prompts(num: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    """`num` prompts of random token ids (past the first 100, where special tokens live), lengths
    drawn uniformly from [lo, hi]."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(*lengths))] for _ in range(num)]


def random_lengths(num: int, lengths: tuple[int, int], seed: int) -> list[int]:
    """`num` lengths drawn uniformly from [lo, hi] (all `lo` when lo == hi)."""
    import random

    rng = random.Random(seed)
    return [rng.randint(*lengths) for _ in range(num)]


def span(lengths: tuple[int, int]) -> str:
    """(16, 128) -> "16-128"; (32, 32) -> "32"."""
    return str(lengths[0]) if lengths[0] == lengths[1] else f"{lengths[0]}-{lengths[1]}"


def left_padded(prompts: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """One batch of prompts of unequal lengths, padded on the left (as decoder-only `generate`
    needs), and its attention mask (0 over the padding)."""
    longest = max(len(p) for p in prompts)
    ids = [[pad] * (longest - len(p)) + p for p in prompts]
    mask = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
    return ids, mask


def tokens_per_s(output_lens: list[int], seconds: float) -> dict[str, float]:
    """Only the tokens each request asked for count, whatever else was computed."""
    tokens = sum(output_lens)
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds}


def prompts_of_lengths(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Prompts of the given lengths, of random token ids (past the first 100) drawn from `seed`."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


def shardlm_seconds(llm: Any, prompts: list[list[int]], output_lens: list[int]) -> float:
    """Seconds of one `llm.generate` of every prompt at once, each to its own max_tokens (greedy,
    no early stop)."""
    from workers.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    if generated != output_lens:
        raise RuntimeError(f"shardlm generated {sum(generated)} tokens where {sum(output_lens)} were asked for")
    return seconds


def transformers_seconds(hf: Any, prompts: list[list[int]], output_lens: list[int]) -> float:
    """Seconds of transformers' batched greedy `generate` of the prompts as one batch (left-padded
    when lengths differ), run to the longest output: every row computes that many tokens, though
    only each request's own count (`interleaved_throughput`)."""
    import torch

    pad = 0
    ids, mask = (torch.tensor(rows, device=hf.device) for rows in left_padded(prompts, pad))
    longest = max(output_lens)
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad,
        )
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_throughput(
    engine_args: dict, model: str, dtype: str, input_lens: list[int], output_lens: list[int], vocab: int, seed: int, repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Both libraries' best of `repeat` rounds, taking turns (a machine whose speed drifts slows
    both alike). Every round has the same lengths and fresh token ids, so that shardlm's prefix
    cache holds nothing of it; each library gets the round's prompts."""
    from driver.entrypoints.llm import LLM

    ours, theirs = [], []
    with LLM(**engine_args) as llm:
        hf = load_transformers_model(model, dtype)
        for round_ in range(repeat):
            prompts = prompts_of_lengths(input_lens, vocab, seed * 1000 + round_)
            ours.append(shardlm_seconds(llm, prompts, output_lens))
            theirs.append(transformers_seconds(hf, prompts, output_lens))
    computed = max(output_lens) * len(input_lens)
    return tokens_per_s(output_lens, min(ours)), {**tokens_per_s(output_lens, min(theirs)), "computed_tokens": computed}


def load_transformers_model(model: str, dtype: str) -> Any:
    """The checkpoint (a folder, or a .gguf file) in transformers, on the GPU where there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return _load_transformers_model(model, dtype).to(device)


def _load_transformers_model(model: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    kwargs: dict[str, Any] = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()


def format_throughput(setup: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    return "\n".join(
        [
            f"throughput: {setup}",
            f"{'':28}{'shardlm':>12}{'transformers':>14}",
            f"{'output tokens':28}{ours['output_tokens']:>12.0f}{theirs['output_tokens']:>14.0f}",
            f"{'seconds':28}{ours['seconds']:>12.2f}{theirs['seconds']:>14.2f}",
            f"{'output tokens / s':28}{ours['tokens_per_s']:>12.1f}{theirs['tokens_per_s']:>14.1f}",
            *(
                [f"{'tokens computed (padded)':28}{'':>12}{theirs['computed_tokens']:>14.0f}"]
                if theirs.get("computed_tokens", theirs["output_tokens"]) != theirs["output_tokens"]
                else []
            ),
            f"ratio (shardlm / transformers): {ratio:.2f}",
        ]
    )
