"""The prefix cache (driver/engine/block_manager.py), played through the real scheduler against a
stand-in model that writes, for every position, the whole prefix it was computed from: a
referenced block is never evicted or handed out twice, and every cache hit holds exactly the
tokens (and prefixes) the sequence would have computed itself (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from driver.engine.block_manager import BlockManager
from driver.engine.outputs import RequestMetrics
from driver.engine.scheduler import Scheduler
from driver.engine.sequence import Request, Sequence, Status
from workers.sampling_params import SamplingParams


def make_request(request_id: int, prompt: list[int], n: int = 1, prompt_logprobs: int | None = None) -> Request:
    params = SamplingParams(n=n, prompt_logprobs=prompt_logprobs)
    request = Request(str(request_id), list(prompt), params, RequestMetrics(arrival_time=0.0))
    for index in range(n):
        request.seqs.append(Sequence(request_id * 10 + index, request, index, None))
    return request


class StandInModel:
    """KV slots hold the prefix each position was computed from; reading a slot checks it."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def run(self, seq: Sequence, start: int, stop: int) -> None:
        tokens = seq.token_slice(0, stop)
        bs = self.block_size
        for p in range(start):  # attention reads the context from the blocks
            assert self.slots.get((seq.block_table[p // bs], p % bs)) == tuple(tokens[: p + 1]), "a cache hit with other tokens"
        for p in range(start, stop):
            self.slots[seq.block_table[p // bs], p % bs] = tuple(tokens[: p + 1])


def check_invariants(manager: BlockManager, seqs: list[Sequence], num_blocks: int) -> None:
    held: dict[int, int] = {}
    for seq in seqs:
        assert len(seq.block_table) == len(set(seq.block_table)), "a block twice in one table"
        for block in seq.block_table:
            held[block] = held.get(block, 0) + 1
    assert held == manager.ref_counts, "reference counts are the tables holding each block"
    assert not set(held) & set(manager.free_blocks), "a referenced block is on the free list"
    assert sorted(list(held) + list(manager.free_blocks)) == list(range(1, num_blocks + 1))
    assert all(manager.cached[key] == block for block, key in manager.key_of.items())
    assert len(manager.cached) == len(manager.key_of)


def play(
    manager: BlockManager, requests: list[Request], budget: int, outputs: int, seed: int, max_steps: int = 3000
) -> StandInModel:
    """Run every request to `outputs` tokens per completion; outputs drawn from a small alphabet."""
    rng = random.Random(seed)
    scheduler = Scheduler(manager, max_num_seqs=6, max_num_batched_tokens=budget)
    model = StandInModel(manager.block_size)
    seqs = [s for r in requests for s in r.seqs]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(max_steps):
        if not scheduler.has_work():
            break
        step = scheduler.schedule()
        for seq, count in step.scheduled:
            start, stop = seq.num_computed_tokens, seq.num_computed_tokens + count
            model.run(seq, start, stop)
            manager.computed(seq, start, stop)
            seq.num_computed_tokens = stop
            if stop == seq.num_tokens:
                seq.output_token_ids.append(rng.randrange(3))
                if len(seq.output_token_ids) == outputs:
                    seq.status = Status.FINISHED
                    scheduler.finish(seq)
        check_invariants(manager, seqs, manager.num_blocks)
    assert all(s.finished for s in seqs)
    return model


PROMPTS = st.lists(
    st.tuples(st.integers(0, 2), st.lists(st.integers(0, 2), max_size=9), st.integers(1, 3)), min_size=1, max_size=7
)


@settings(max_examples=150, deadline=None)
@given(
    prompts=PROMPTS,
    num_blocks=st.integers(10, 40),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(8, 40),
    seed=st.integers(0, 9),
)
def test_hits_hold_the_same_tokens_and_referenced_blocks_stay(prompts, num_blocks, block_size, budget, seed) -> None:
    """Prompts share one of three stems, with pool pressure (preemption, eviction) and n > 1."""
    stems = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 1, 1], [9] * 10]
    requests = [make_request(i, stems[s] + tail, n) for i, (s, tail, n) in enumerate(prompts)]
    if any(-(-(len(r.prompt_token_ids) + 4) // block_size) > num_blocks for r in requests):
        return
    manager = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    play(manager, requests, budget, outputs=4, seed=seed)
    assert manager.num_free == num_blocks


def test_a_repeated_prompt_computes_only_its_last_token() -> None:
    manager = BlockManager(64, 4, enable_prefix_caching=True)
    prompt = list(range(20))
    play(manager, [make_request(0, prompt)], budget=64, outputs=2, seed=0)
    second = make_request(1, prompt)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    scheduler.add(second.seqs[0])
    assert [(s.seq_id, c) for s, c in scheduler.schedule().scheduled] == [(10, 4)]  # the 4 blocks short of its last token
    assert second.seqs[0].num_computed_tokens == 16
    assert manager.stats()["prefix_cache_hits"] == 16 and manager.stats()["prefix_cache_queries"] == 40


def test_prompt_logprobs_requests_compute_their_prompt() -> None:
    manager = BlockManager(64, 4, enable_prefix_caching=True)
    prompt = list(range(12))
    play(manager, [make_request(0, prompt)], budget=64, outputs=1, seed=0)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    wants = make_request(1, prompt, prompt_logprobs=1)
    scheduler.add(wants.seqs[0])
    assert [c for _, c in scheduler.schedule().scheduled] == [12]


def test_n_completions_share_the_prompts_blocks() -> None:
    manager = BlockManager(64, 4, enable_prefix_caching=True)
    request = make_request(0, list(range(17)), n=3)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    for seq in request.seqs:
        scheduler.add(seq)
    first = scheduler.schedule().scheduled
    assert [(s.index, c) for s, c in first] == [(0, 17)]  # the others wait one step for its blocks
    for seq, count in first:
        manager.computed(seq, 0, count)
        seq.num_computed_tokens = count
        seq.output_token_ids.append(1)
    second = scheduler.schedule().scheduled
    assert sorted((s.index, c) for s, c in second) == [(0, 1), (1, 1), (2, 1)]  # 16 prompt tokens shared
    shared = request.seqs[0].block_table[:4]
    assert all(s.block_table[:4] == shared for s in request.seqs)
    assert all(manager.ref_counts[b] == 3 for b in shared)


def test_preempted_blocks_return_to_the_cache_and_lru_evicts_the_oldest() -> None:
    manager = BlockManager(4, 2, enable_prefix_caching=True)
    a = make_request(0, [1, 2, 3, 4, 5]).seqs[0]
    prefix = manager.cached_prefix(a)
    assert prefix == [] and manager.can_take(a, prefix, 5)
    manager.take(a, prefix)
    manager.grow(a, 5)
    manager.computed(a, 0, 5)
    a.num_computed_tokens = 5
    blocks = list(a.block_table)
    manager.release(a)  # preempted: the two full blocks stay cached, free
    assert manager.num_free == 4 and manager.num_cached == 2
    assert manager.cached_prefix(a) == blocks[:2]
    b = make_request(1, [9, 9, 9, 9, 9, 9, 9]).seqs[0]
    manager.take(b, [])
    manager.grow(b, 5)  # three blocks: the never-used one, then the least recently freed (a's tail first)
    assert manager.num_cached == 1 and manager.cached_prefix(a) == blocks[:1]


def test_off_means_no_sharing() -> None:
    manager = BlockManager(64, 4)
    play(manager, [make_request(0, list(range(20))), make_request(1, list(range(20)))], budget=64, outputs=2, seed=0)
    assert manager.stats()["prefix_cache_hits"] == 0 and manager.num_cached == 0
