"""The block manager never hands out a block twice (property tests), and the scheduler's batching."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from driver.engine.block_manager import BlockManager
from driver.engine.outputs import RequestMetrics
from driver.engine.scheduler import Scheduler
from driver.engine.sequence import Request, Sequence, Status
from workers.sampling_params import SamplingParams


@dataclass(eq=False)
class Table:
    block_table: list[int] = field(default_factory=list)


OPS = st.lists(st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 5), st.integers(0, 200)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 40), block_size=st.sampled_from([1, 4, 16]), ops=OPS)
def test_a_block_is_free_or_in_exactly_one_table(num_blocks, block_size, ops) -> None:
    manager = BlockManager(num_blocks, block_size)
    tables = [Table() for _ in range(6)]
    for op, who, tokens in ops:
        table = tables[who]
        if op == "grow":
            if manager.can_grow(table, tokens):
                manager.grow(table, tokens)
                assert len(table.block_table) >= manager.blocks_for(tokens)
        else:
            manager.release(table)
            assert table.block_table == []
        in_use = [b for t in tables for b in t.block_table]
        assert len(in_use) == len(set(in_use)), "a block handed out twice"
        assert sorted(in_use + list(manager.free_blocks)) == list(range(1, num_blocks + 1)), "block 0 is never handed out"


def test_growing_past_the_free_list_refuses() -> None:
    manager = BlockManager(2, 4)
    table = Table()
    assert not manager.can_grow(table, 9)
    try:
        manager.grow(table, 9)
    except RuntimeError as exc:
        assert "3 blocks asked for, 2 free" in str(exc)
    else:
        raise AssertionError("grew past the pool")


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    request = Request(str(seq_id), list(range(prompt_len)), SamplingParams(), RequestMetrics(arrival_time=0.0))
    seq = Sequence(seq_id, request, 0, None)
    request.seqs.append(seq)
    return seq


def run_step(scheduler: Scheduler) -> list[tuple[int, int]]:
    """Schedule a step and play the model: computed tokens advance, finished prompts get a token."""
    step = scheduler.schedule()
    for seq, count in step.scheduled:
        seq.num_computed_tokens += count
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(7)
    return [(seq.seq_id, count) for seq, count in step.scheduled]


def test_long_prompts_are_prefilled_in_chunks_and_decodes_come_first() -> None:
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make_seq(0, 3), make_seq(1, 25)
    scheduler.add(a)
    scheduler.add(b)
    assert run_step(scheduler) == [(0, 3), (1, 7)]
    assert run_step(scheduler) == [(0, 1), (1, 9)]  # a decodes, b's next chunk
    assert run_step(scheduler) == [(0, 1), (1, 9)]
    assert b.num_computed_tokens == 25 and len(b.output_token_ids) == 1


def test_max_num_seqs_limits_admission() -> None:
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(i, 2) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert [s for s, _ in run_step(scheduler)] == [0, 1]
    assert seqs[2].status is Status.WAITING


def test_newest_sequence_is_preempted_and_recomputed() -> None:
    scheduler = Scheduler(BlockManager(3, 2), max_num_seqs=4, max_num_batched_tokens=100)
    old, new = make_seq(0, 2), make_seq(1, 2)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: 1 block each, 1 free
    run_step(scheduler)  # old decodes into a second block (3 tokens); new needs one too: none left
    assert new.status is Status.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert old.status is Status.RUNNING
    scheduler.finish(old)
    assert run_step(scheduler) == [(1, 3)], "the preempted sequence recomputes prompt and output"


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    num_blocks=st.integers(8, 30),
    budget=st.integers(8, 64),
    max_seqs=st.integers(1, 8),
)
def test_every_admitted_sequence_finishes(prompts, num_blocks, budget, max_seqs) -> None:
    """Any mix of prompts, blocks and budget: every sequence gets 5 tokens, no block is shared."""
    block_size = 4
    manager = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(manager, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    seqs = [make_seq(i, n) for i, n in enumerate(prompts) if -(-(n + 5) // block_size) <= num_blocks]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(2000):
        if not scheduler.has_work():
            break
        run_step(scheduler)
        for seq in list(scheduler.running):
            if len(seq.output_token_ids) == 5:
                seq.status = Status.FINISHED
                scheduler.finish(seq)
        in_use = [b for s in seqs for b in s.block_table]
        assert len(in_use) == len(set(in_use))
    assert all(len(s.output_token_ids) == 5 for s in seqs)
    assert manager.num_free == num_blocks
