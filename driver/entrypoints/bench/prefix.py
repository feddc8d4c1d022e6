"""`shardlm bench prefix`: one long prompt sent twice, with prefix caching on and off, in one run.

The second request of the same prompt finds all of its full blocks in the prefix cache and
computes only the last token's block; with caching off it computes the whole prompt again.
The ratio second / first is the figure (issue 11 asks for at most 0.2 at 2,000 tokens).
"""

from __future__ import annotations

import time
from typing import Any

from driver.entrypoints.bench.throughput import random_prompts


def run_prefix(engine_args: dict[str, Any], prompt_len: int, output_len: int, seed: int) -> dict[str, Any]:
    """Seconds of the first and second request of one prompt (greedy), per setting of prefix
    caching, and whether their tokens agree."""
    from driver.entrypoints.llm import LLM
    from workers.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    rows: dict[str, Any] = {}
    tokens: dict[str, list[list[int]]] = {}
    for caching in (True, False):
        args = {**engine_args, "enable_prefix_caching": caching, "max_model_len": max(prompt_len + output_len + 16, 2048)}
        with LLM(**args) as llm:
            vocab = llm.config.model.arch.vocab_size
            prompt = random_prompts(1, (prompt_len, prompt_len), vocab, seed)[0]
            warm = random_prompts(1, (32, 32), vocab, seed + 1)[0]  # shares no block with `prompt`
            llm.generate([{"prompt_token_ids": warm}], params, use_tqdm=False)
            seconds, outs = [], []
            for _ in range(2):
                start = time.perf_counter()
                out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
                seconds.append(time.perf_counter() - start)
                outs.append(list(out.outputs[0].token_ids))
            stats = llm.stats()
        name = "on" if caching else "off"
        rows[name] = {"first_s": seconds[0], "second_s": seconds[1], "ratio": seconds[1] / seconds[0], **_cache_stats(stats)}
        tokens[name] = outs
    rows["same_tokens"] = tokens["on"][0] == tokens["on"][1] == tokens["off"][0] == tokens["off"][1]
    return rows


def _cache_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("prefix_cache_hit_rate", "prefix_cache_hits", "prefix_cache_queries") if k in stats}


def format_prefix(setup: str, rows: dict[str, Any]) -> str:
    lines = [f"prefix: {setup}", f"{'prefix caching':18}{'first s':>10}{'second s':>10}{'second/first':>14}{'hit rate':>10}"]
    for name in ("on", "off"):
        r = rows[name]
        hit = f"{r['prefix_cache_hit_rate']:.2f}" if "prefix_cache_hit_rate" in r else "-"
        lines.append(f"{name:18}{r['first_s']:>10.3f}{r['second_s']:>10.3f}{r['ratio']:>14.3f}{hit:>10}")
    lines.append(f"same greedy tokens on and off, first and second: {'yes' if rows['same_tokens'] else 'NO'}")
    return "\n".join(lines)
