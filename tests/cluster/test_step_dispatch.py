"""Steps through the shared-memory channel, a Ray Compiled Graph and plain actor calls give the
same tokens and prompt logprobs, at one and two ranks, with messages and results too large for
the channel's slots going through the object store; a rank that dies mid-step is named
(tests/cluster/test_engine_lifecycle.py kills one under the default, the channel)."""

from __future__ import annotations

import pytest

from cluster.step_channel import SLOT_BYTES_ENV
from cluster.worker_group import STEP_DISPATCH_ENV, step_dispatch_wanted
from driver import LLM, SamplingParams

SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=4 * 2**20, device="cpu", skip_tokenizer_init=True)
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [5] * 20, list(range(3, 200))]
DISPATCH_NAMES = {"shm": "shared memory", "compiled": "compiled graph", "plain": "plain calls"}


def tokens(llm: LLM) -> list:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=11, ignore_eos=True)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False) + llm.generate(PROMPTS, seeded, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.prompt_logprobs) for o in outs]


def close(a: list, b: list) -> bool:
    """The same tokens, and prompt logprobs of the same tokens and ranks within float32 rounding
    (two ranks add their partial sums in another order than one)."""
    for (tokens_a, prompt_a), (tokens_b, prompt_b) in zip(a, b, strict=True):
        if tokens_a != tokens_b or (prompt_a is None) != (prompt_b is None):
            return False
        for pa, pb in zip(prompt_a or [], prompt_b or [], strict=True):
            if (pa is None) != (pb is None) or (pa and pa.keys() != pb.keys()):
                return False
            if pa and any(pa[t].rank != pb[t].rank or abs(pa[t].logprob - pb[t].logprob) > 1e-5 for t in pa):
                return False
    return True


def test_every_dispatch_gives_the_same_tokens(ray_cluster, tiny_checkpoint, monkeypatch) -> None:
    folder, _ = tiny_checkpoint("llama_8h4kv")
    monkeypatch.setenv(SLOT_BYTES_ENV, "512")  # the long prompt's message and its prompt logprobs spill
    runs = {}
    for tp, dispatch in ((1, "plain"), (2, "compiled"), (2, "shm")):  # tp 1 through the channel: every e2e test
        monkeypatch.setenv(STEP_DISPATCH_ENV, dispatch)
        with LLM(str(folder), tensor_parallel_size=tp, **SMALL) as llm:
            assert llm.load_report.step_dispatch == DISPATCH_NAMES[dispatch]
            runs[tp, dispatch] = tokens(llm)
            if dispatch == "shm":
                assert_calls_pause_the_channel(llm, runs[tp, dispatch])
    assert runs[2, "compiled"] == runs[2, "shm"]
    assert close(runs[1, "plain"], runs[2, "shm"])


def assert_calls_pause_the_channel(llm: LLM, first: list) -> None:
    """A call to the ranks between steps (prompt logits) ends their step loops and opens a new
    channel after it: the steps after it give the same tokens through shared memory, and each
    rank has run all its work (load, profile, steps, the call) on one thread."""
    import ray

    llm.prompt_logits([[1, 2, 3]])
    assert tokens(llm) == first

    def ranks(engine):
        workers = engine.workers
        threads = [ray.get(a.__ray_call__.remote(lambda actor: actor.compute_threads)) for a in workers.actors]
        return workers.step_dispatch, workers.channel is not None, threads

    dispatch, channel_open, threads = ray.get(llm._engine.__ray_call__.remote(ranks))
    assert dispatch == "shared memory" and channel_open
    assert [len(t) for t in threads] == [1, 1]


def test_a_call_is_refused_while_a_step_is_unanswered() -> None:
    from types import SimpleNamespace

    from cluster.worker_group import WorkerGroup
    from parallel.errors import ShardLMError

    group = WorkerGroup([])
    group.channel = SimpleNamespace(unanswered=1)
    with pytest.raises(ShardLMError, match=r"prompt_logits while 1 step\(s\) are running on the ranks"):
        group.call("prompt_logits", [[1]])


def test_the_default_dispatch(monkeypatch) -> None:
    monkeypatch.delenv(STEP_DISPATCH_ENV, raising=False)
    assert step_dispatch_wanted("cpu")[0] == "shm"
    assert step_dispatch_wanted("cuda")[0] == "plain"  # until the channel has run on a GPU
    monkeypatch.setenv(STEP_DISPATCH_ENV, "compiled")
    assert step_dispatch_wanted("cuda") == ("compiled", f"{STEP_DISPATCH_ENV}=compiled")
    monkeypatch.setenv(STEP_DISPATCH_ENV, "fast")
    with pytest.raises(Exception, match=r"SHARDLM_STEP_DISPATCH='fast' is not one of shm, compiled, plain"):
        step_dispatch_wanted("cpu")


def test_rank_errors_carry_no_colour_codes() -> None:
    from cluster.worker_group import worker_error

    error = worker_error(1, "load_model", ValueError("\x1b[36mray::WorkerActor.execute()\x1b[39m failed"))
    assert str(error).startswith("rank 1 failed in load_model: ValueError: ray::WorkerActor.execute() failed")
    assert "\x1b" not in str(error)
