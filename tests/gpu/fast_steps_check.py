"""Issue 11's checks on a CUDA GPU (run by .ci/gpu-check.sh; not part of the CPU suite).

On the random-weight SmolLM2-shaped model that tests/gpu/engine_check.py writes:
- CUDA graphs (SHARDLM_CUDA_GRAPHS=1) against eager steps (enforce_eager=True): the greedy tokens
  and every decode step's logprobs of the chosen and top tokens;
- async scheduling against one step at a time, and the compiled graph against plain calls: the
  greedy tokens.
Each variant starts its own engine; the results go to OUT_DIR/fast_steps.json.

Usage: python tests/gpu/fast_steps_check.py OUT_DIR [MODEL_FOLDER]
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPTS = [[1, 17, 42, 99, 5, 250, 299, 3] * 3, [2, 200], list(range(300, 400)), [7, 8, 9, 10] * 4, [5] * 9]
TOKENS = 32


def run(folder: str, env: dict[str, str], **engine: object) -> dict:
    """Greedy tokens and per-step logprobs (chosen token first, then the top 5) of every prompt."""
    from driver import LLM, SamplingParams

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with LLM(folder, skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=512, **engine) as llm:
            params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, logprobs=5)
            outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            report = llm.load_report
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[{t: e.logprob for t, e in step.items()} for step in o.outputs[0].logprobs] for o in outputs]
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "cuda_graph_bytes": report.cuda_graph_bytes,
        "step_dispatch": report.step_dispatch,
        "phases": report.phases,
    }


def logprob_gap(a: dict, b: dict) -> float:
    """The largest difference between two runs' logprobs of the same token at the same step."""
    gap = 0.0
    for seq_a, seq_b in zip(a["logprobs"], b["logprobs"]):
        for step_a, step_b in zip(seq_a, seq_b):
            for token in step_a.keys() & step_b.keys():
                gap = max(gap, abs(step_a[token] - step_b[token]))
    return gap


def main(out: Path, folder: str) -> None:
    results: dict[str, object] = {}

    def variant(name: str, env: dict[str, str], **engine: object) -> dict | None:
        try:
            results[name] = run(folder, env, **engine)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        (out / "fast_steps.json").write_text(json.dumps(results, indent=1, default=str))
        return results[name] if "error" not in results[name] else None

    eager = variant("eager", {}, enforce_eager=True, async_scheduling=False)
    graphs = variant("cuda_graphs", {"SHARDLM_CUDA_GRAPHS": "1"}, async_scheduling=False)
    overlapped = variant("async_scheduling", {}, enforce_eager=True, async_scheduling=True)
    compiled = variant("compiled_graph", {"SHARDLM_STEP_DISPATCH": "compiled"}, enforce_eager=True, async_scheduling=False)
    channel = variant("step_channel", {"SHARDLM_STEP_DISPATCH": "shm"}, enforce_eager=True, async_scheduling=True)
    summary = {}
    if eager and graphs:
        summary["cuda_graphs_same_tokens"] = graphs["tokens"] == eager["tokens"]
        summary["cuda_graphs_max_logprob_gap"] = logprob_gap(graphs, eager)
        summary["cuda_graph_bytes"] = graphs["cuda_graph_bytes"]
    for name, other in (("async_scheduling", overlapped), ("compiled_graph", compiled), ("step_channel", channel)):
        if eager and other:
            summary[f"{name}_same_tokens"] = other["tokens"] == eager["tokens"]
    results["summary"] = summary
    print(json.dumps(summary, indent=1), flush=True)
    (out / "fast_steps.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "/tmp/shardlm-gpu-check/model")
