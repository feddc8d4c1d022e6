"""Steps one at a time and async scheduling (the default on CPU) through the real engine (ranks
on Ray): greedy tokens equal transformers' with a stop token and under preemption, and none is
shown past a stop. The rest of the suite runs with the default."""

from __future__ import annotations

import pytest

from driver import LLM, SamplingParams
from tests.helpers import transformers_greedy

PROMPTS = [[1, 17, 42, 99, 5], [2, 200], list(range(30, 70)), [7] * 20, [3, 4, 5, 6, 7, 8], list(range(100, 133))]
NEW = [24, 9, 30, 16, 1, 20]


@pytest.mark.parametrize("tp,overlap", [(1, False), (2, True)], ids=["tp1-one-step-at-a-time", "tp2-async"])
def test_steps_give_transformers_greedy_tokens(ray_cluster, tiny_checkpoint, tp, overlap) -> None:
    folder, hf = tiny_checkpoint("llama_8h4kv")
    refs = [transformers_greedy(hf, p, n) for p, n in zip(PROMPTS, NEW)]
    stop_at = refs[0][5]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in NEW]
    params[0] = SamplingParams(temperature=0, max_tokens=NEW[0], stop_token_ids=[stop_at])
    engine = dict(
        max_num_batched_tokens=64, max_num_seqs=8, max_model_len=96, num_gpu_blocks_override=7, block_size=16, device="cpu"
    )
    with LLM(str(folder), tensor_parallel_size=tp, skip_tokenizer_init=True, async_scheduling=overlap, **engine) as llm:
        assert llm.config.scheduler.async_scheduling is overlap
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        stats = llm.stats()
    first = refs[0][: refs[0].index(stop_at) + 1]
    assert outputs[0].outputs[0].token_ids == first and outputs[0].outputs[0].finish_reason == "stop"
    for out, ref in zip(outputs[1:], refs[1:]):
        assert out.outputs[0].token_ids == ref and out.outputs[0].finish_reason == "length"
    assert stats["preemptions"] > 0  # seven blocks of 16 tokens hold two or three of these at once
