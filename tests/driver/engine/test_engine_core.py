"""The engine core (driver/engine/core.py) on its own, driven by a fake executor: no tokenizer, no ranks.

The fake model's next token is the sequence's last token plus one (mod the vocabulary), so
the tokens a completion gets do not depend on how its prompt was chunked, cached or preempted.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from driver.engine.core import CoreRequest, EngineCore
from driver.engine.output_processor import OutputProcessor
from parallel.state import TensorParallelGroup
from workers.batch import PLACEHOLDER, Batch, FailedSample, PromptLogprobs, SampledToken, StepResult
from workers.block_tables import BlockTables
from workers.placeholders import LastTokens
from workers.sampling_params import SamplingParams

VOCAB = 50


def config(
    num_seqs: int = 4, batched: int = 64, max_len: int = 64, block_size: int = 4, caching: bool = True, overlap: bool = False
) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(max_model_len=max_len, arch=SimpleNamespace(vocab_size=VOCAB)),
        scheduler=SimpleNamespace(max_num_seqs=num_seqs, max_num_batched_tokens=batched, async_scheduling=overlap),
        cache=SimpleNamespace(block_size=block_size, enable_prefix_caching=caching),
    )


class FakeExecutor:
    """Checks what a rank would check (known sequences, block tables that cover the context),
    fills placeholders as the ranks do (`workers.placeholders`), and samples last token + 1;
    logprobs -1.0, rank 1; prompt logprobs -0.5 each. It runs a step when it is sent."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.tables = BlockTables(64)
        self.known: set[int] = set()
        self.batches: list[Batch] = []
        self.last_tokens = LastTokens(TensorParallelGroup.single(), torch.device("cpu"))
        self.waited = 0

    def __call__(self, batch: Batch) -> Callable[[], StepResult]:
        batch = self.last_tokens.fill(batch)
        result = self.run(batch)
        self.last_tokens.record(batch, result)
        sent = len(self.batches)

        def wait() -> StepResult:
            assert self.waited == sent - 1, "results taken out of order"
            self.waited = sent
            return result

        return wait

    def run(self, batch: Batch) -> StepResult:
        self.batches.append(batch)
        assert PLACEHOLDER not in batch.token_ids
        self.tables.apply(batch.table_updates, batch.finished_seq_ids)
        self.known -= set(batch.finished_seq_ids)
        self.known |= {s.seq_id for s in batch.new_seqs}
        sampled, prompt, end = [], [], 0
        for i, seq_id in enumerate(batch.seq_ids):
            assert seq_id in self.known, "a step for a sequence rank 0 was never sent"
            row = self.tables.gather([seq_id])[0]
            assert (row[: -(-batch.context_lens[i] // self.block_size)] > 0).all(), "context past the table"
            end += batch.query_lens[i]
            if batch.prompt_logprob_counts[i]:
                count = batch.prompt_logprob_counts[i]
                first = batch.context_lens[i] - batch.query_lens[i] + 1
                prompt.append(
                    PromptLogprobs(seq_id=seq_id, start=first, logprobs=[-0.5] * count, ranks=[1] * count, top=[[]] * count)
                )
            if batch.sample[i]:
                sampled.append(
                    SampledToken(seq_id=seq_id, token_id=(batch.token_ids[end - 1] + 1) % VOCAB, logprob=-1.0, rank=1, top=[])
                )
        return StepResult(sampled=sampled, prompt_logprobs=prompt)


def run(core: EngineCore, max_steps: int = 500) -> dict[str, dict[int, tuple[list[int], str, object]]]:
    """Step until done: per request, per completion, (tokens, finish reason, stop reason)."""
    done: dict[str, dict[int, tuple[list[int], str, object]]] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            return done
        for out in core.step():
            for delta in out.seqs:
                tokens.setdefault((out.request_id, delta.index), []).append(delta.sampled.token_id)
                if delta.finish_reason is not None:
                    done.setdefault(out.request_id, {})[delta.index] = (
                        tokens[out.request_id, delta.index],
                        delta.finish_reason,
                        delta.stop_reason,
                    )
    raise AssertionError("the core did not finish")


def request(request_id: str, prompt: list[int], eos: int | None = None, **params: object) -> CoreRequest:
    return CoreRequest(
        request_id=request_id, prompt_token_ids=prompt, params=SamplingParams(**params), arrival_time=0.0, eos_token_id=eos
    )


def make_core(num_blocks: int = 64, **kwargs: object) -> tuple[EngineCore, FakeExecutor]:
    cfg = config(**kwargs)
    executor = FakeExecutor(cfg.cache.block_size)
    return EngineCore(cfg, num_blocks=num_blocks, submit=executor), executor


def test_token_ids_alone_end_a_completion() -> None:
    core, _ = make_core()
    core.add_requests(
        [
            request("eos", [1, 2], eos=5, max_tokens=10),
            request("stop-id", [10], stop_token_ids=[13], max_tokens=10),
            request("length", [20], max_tokens=3),
            request("min", [1, 2], eos=4, min_tokens=3, max_tokens=4),
        ]
    )
    done = run(core)
    assert done["eos"][0] == ([3, 4, 5], "stop", None)
    assert done["stop-id"][0] == ([11, 12, 13], "stop", 13)
    assert done["length"][0] == ([21, 22, 23], "length", None)
    assert done["min"][0] == ([3, 4, 5, 6], "length", None)  # eos (4) came before min_tokens
    assert not core.requests and not core.seqs


def test_max_model_len_ends_a_completion() -> None:
    core, _ = make_core(max_len=8)
    core.add_requests([request("r", [0] * 6, max_tokens=100)])
    assert run(core)["r"][0] == ([1, 2], "length", None)


def test_duplicate_ids_queue_nothing() -> None:
    core, _ = make_core()
    core.add_requests([request("a", [1])])
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        core.add_requests([request("b", [1]), request("a", [2])])
    with pytest.raises(ValueError, match="'c' is already in use"):
        core.add_requests([request("c", [1]), request("c", [2])])
    assert list(core.requests) == ["a"]


def test_n_completions_finish_the_request_together() -> None:
    core, executor = make_core()
    core.add_requests([request("n", [7, 8], n=3, max_tokens=2, seed=1)])
    done = run(core)
    assert sorted(done["n"]) == [0, 1, 2]
    assert all(tokens == [9, 10] for tokens, _, _ in done["n"].values())
    seeds = [s.seed for b in executor.batches for s in b.new_seqs]
    assert len(set(seeds)) == 3 and seeds[0] == 1


def test_finish_ends_one_completion_and_the_ranks_forget_it() -> None:
    core, executor = make_core()
    core.add_requests([request("r", [1], n=2, max_tokens=50)])
    core.step()
    core.finish("r", 0, "stop", "a stop string")
    assert core.requests["r"].seqs[0].finished and not core.requests["r"].finished
    core.step()
    assert executor.batches[-1].finished_seq_ids == [core.requests["r"].seqs[0].seq_id]
    assert core.requests["r"].seqs[1].seq_id in executor.batches[-1].seq_ids
    core.finish("r", 1, "stop", "x")
    assert not core.has_unfinished()
    core.finish("r", 1, "stop", "x")  # gone already: nothing happens


def test_abort_frees_every_block() -> None:
    core, _ = make_core()
    free = core.scheduler.blocks.num_free
    core.add_requests([request("a", list(range(10)), max_tokens=40), request("b", [3], max_tokens=40)])
    for _ in range(3):
        core.step()
    core.abort(["a", "b", "unknown"])
    assert not core.has_unfinished() and core.scheduler.blocks.num_free == free


def test_preemption_and_caching_give_the_same_tokens() -> None:
    """A pool so small that sequences are preempted and resumed, with and without the prefix
    cache, gives what an ample pool gives."""
    prompts = [[i % 7 + 1] * (5 + 3 * i) for i in range(6)]

    def tokens(num_blocks: int, caching: bool) -> dict:
        core, _ = make_core(num_blocks=num_blocks, caching=caching, batched=16)
        core.add_requests([request(str(i), p, max_tokens=12) for i, p in enumerate(prompts)])
        done = run(core)
        return {rid: c[0][0] for rid, c in done.items()}, core.preemptions

    ample, _ = tokens(200, True)
    for caching in (True, False):
        tight, preemptions = tokens(12, caching)
        assert tight == ample
        assert preemptions > 0


def test_prompt_logprobs_cover_the_prompt_once() -> None:
    core, _ = make_core(batched=4)
    core.add_requests([request("p", list(range(1, 11)), prompt_logprobs=0, max_tokens=2)])
    outputs = OutputProcessor(None)
    outputs.add("p", None, list(range(1, 11)), SamplingParams(prompt_logprobs=0, max_tokens=2), 0.0)
    final = None
    while core.has_unfinished():
        results, _, _ = outputs.process(core.step())
        final = results[-1] if results else final
    assert final.finished and len(final.prompt_logprobs) == 10 and final.prompt_logprobs[0] is None
    assert all(entry[token].logprob == -0.5 for entry, token in zip(final.prompt_logprobs[1:], range(2, 11)))
    assert final.outputs[0].token_ids == [11, 12] and final.metrics.finished_time is not None


def mixed_requests() -> list[CoreRequest]:
    return [
        request("eos", [1, 2], eos=6, max_tokens=10),
        request("stop-id", [10] * 9, stop_token_ids=[14], max_tokens=10),
        request("length", list(range(20, 33)), max_tokens=5),
        request("n", [7, 8], n=3, max_tokens=4, seed=2),
        request("long", [0] * 3, max_tokens=40),
        request("logprobs", list(range(1, 12)), prompt_logprobs=0, logprobs=0, max_tokens=3),
        request("min", [1, 2], eos=4, min_tokens=3, max_tokens=4),
    ]


@pytest.mark.parametrize("num_blocks", [64, 14])
def test_async_scheduling_gives_the_tokens_of_sync_steps(num_blocks: int) -> None:
    """Overlapped steps (the next sent before the last one's result) give every completion the
    tokens, finish reasons and prompt logprobs of one step at a time, with preemption too."""
    results = {}
    for overlap in (False, True):
        core, _ = make_core(num_blocks=num_blocks, overlap=overlap, batched=16, max_len=48)
        core.add_requests(mixed_requests())
        outputs = OutputProcessor(None)
        for r in mixed_requests():
            outputs.add(r.request_id, None, r.prompt_token_ids, r.params, 0.0)
        final = {}
        while core.has_unfinished():
            for out in outputs.process(core.step())[0]:
                final[out.request_id] = out
        results[overlap] = {
            rid: ([(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs], o.prompt_logprobs)
            for rid, o in final.items()
        }
        assert all(o.finished for o in final.values()) and not core.seqs
        assert core.scheduler.blocks.num_free == num_blocks
    assert results[True] == results[False]


def test_async_scheduling_never_shows_a_token_past_a_stop_string() -> None:
    """The output processor finds a stop string after the next step has been sent: that step's
    token for the completion is computed, dropped by the core, and never reaches an output."""
    from tests.driver.engine.test_output_processor import LetterTokenizer

    core, executor = make_core(overlap=True)
    params = SamplingParams(stop=["e"], max_tokens=20)
    core.add_requests([CoreRequest(request_id="r", prompt_token_ids=[0], params=params, arrival_time=0.0)])
    outputs = OutputProcessor(LetterTokenizer())
    outputs.add("r", None, [0], params, 0.0)
    seen = []
    while core.has_unfinished():
        results, hits, _ = outputs.process(core.step())
        seen.extend(results)
        for request_id, index, stop in hits:
            core.finish(request_id, index, "stop", stop)
    final = seen[-1]
    assert final.finished and final.outputs[0].token_ids == [1, 2, 3, 4] and final.outputs[0].text == "bcd"
    assert all(len(o.outputs[0].token_ids) <= 4 for o in seen)
    sampled_for_r = sum(1 for b in executor.batches for s in b.sample if s)
    assert sampled_for_r == 5  # one token past "e" was computed, and dropped


def test_async_scheduling_leaves_out_completions_that_end_by_length() -> None:
    core, executor = make_core(overlap=True)
    core.add_requests([request("r", [1], max_tokens=3)])
    assert run(core)["r"][0] == ([2, 3, 4], "length", None)
    assert sum(len(b.seq_ids) for b in executor.batches) == 3  # no step computed a fourth token


def test_a_failed_sample_ends_its_request_alone() -> None:
    """A FailedSample from rank 0 ends its request: the output carries the error and no token
    (the stand-in is never shown; the output processor ends each completion with "error"), and
    the request batched with it goes on."""
    core, executor = make_core()
    core.add_requests([request("bad", [1], n=2, max_tokens=5), request("good", [10], max_tokens=3)])
    step = executor.run

    def failing(batch: Batch) -> StepResult:
        result = step(batch)
        bad = core.requests["bad"].seqs[0].seq_id if "bad" in core.requests else None
        failed = [FailedSample(bad, "sampling failed: boom")] if bad in batch.seq_ids else []
        return StepResult(sampled=result.sampled, prompt_logprobs=result.prompt_logprobs, failed=failed)

    executor.run = failing
    outputs = core.step()
    failed = next(o for o in outputs if o.request_id == "bad")
    assert failed.error == "sampling failed: boom"
    assert failed.seqs == []
    assert "bad" not in core.requests
    assert run(core)["good"][0] == ([12, 13], "length", None)  # its first token came with the failed step
    assert core.scheduler.blocks.num_free == 64


def test_fail_ends_a_request_found_faulty_in_the_driver() -> None:
    core, _ = make_core()
    core.add_requests([request("r", [1], max_tokens=50)])
    core.step()
    core.fail("r", "its detokenization failed")
    core.fail("unknown", "ignored")
    assert not core.requests and core.scheduler.blocks.num_free == 64


def test_blocked_says_what_no_step_can_schedule() -> None:
    """A prompt that needs more KV blocks than the pool has free never schedules: the step
    returns nothing and `blocked` names the request and the numbers, so the engine waits
    instead of stepping again."""
    core, _ = make_core(num_blocks=4, max_len=64)  # 4 blocks of 4 tokens
    assert core.blocked() is None
    core.add_requests([request("big", list(range(30)), max_tokens=2)])
    assert core.step() == []
    assert core.blocked() == "request 'big' waits for KV blocks for 30 tokens, and 4 of the pool's blocks are free"
    core.abort(["big"])
    assert core.blocked() is None


def test_metric_counts_follow_the_requests() -> None:
    core, _ = make_core()
    core.add_requests([request("a", [1, 2, 3], max_tokens=4), request("b", [5], max_tokens=2, n=2)])
    counts = core.metric_counts()
    assert (counts["num_requests_running"], counts["num_requests_waiting"]) == (0, 2)
    core.step()
    counts = core.metric_counts()
    assert (counts["num_requests_running"], counts["num_requests_waiting"]) == (2, 0)
    assert 0 < counts["kv_cache_usage_perc"] < 1
    run(core)
    counts = core.metric_counts()
    assert counts["prompt_tokens"] == 3 + 1  # once per request, as usage counts it (b has n=2)
    assert counts["generation_tokens"] == 4 + 2 * 2
    assert counts["kv_cache_usage_perc"] == 0.0
