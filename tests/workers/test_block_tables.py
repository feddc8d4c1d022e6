"""The ranks' persistent block tables (workers/block_tables.py), updated only from the changes
the driver sends, equal the tables written out in full after any run of admissions, growth,
finishes, preemptions and resumptions (hypothesis, through the real scheduler and prefix cache)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.engine.block_manager import BlockManager
from driver.engine.core import table_update
from driver.engine.scheduler import Scheduler
from driver.engine.sequence import Status
from tests.driver.engine.test_prefix_cache import make_request
from workers.batch import TableUpdate
from workers.block_tables import BlockTables


def from_scratch(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@settings(max_examples=120, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 2)), min_size=1, max_size=10),
    num_blocks=st.integers(8, 30),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(4, 40),
    caching=st.booleans(),
    seed=st.integers(0, 5),
)
def test_persistent_tables_equal_full_tables(prompts, num_blocks, block_size, budget, caching, seed) -> None:
    rng = random.Random(seed)
    requests = [make_request(i, [rng.randrange(3) for _ in range(n)], copies) for i, (n, copies) in enumerate(prompts)]
    if any(-(-(len(r.prompt_token_ids) + 6) // block_size) > num_blocks for r in requests):
        return
    manager = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=budget)
    ranks = BlockTables(max_blocks_per_seq=64, rows=2)  # rows grow as sequences come
    for seq in (s for r in requests for s in r.seqs):
        scheduler.add(seq)
    finished: list[int] = []
    for _ in range(3000):
        if not scheduler.has_work():
            break
        step = scheduler.schedule()
        if not step.scheduled:
            continue
        updates = [u for u in (table_update(seq) for seq, _ in step.scheduled) if u is not None]
        ranks.apply(updates, finished)
        finished = []
        seqs = [seq for seq, _ in step.scheduled]
        assert torch.equal(ranks.gather([s.seq_id for s in seqs]), from_scratch([s.block_table for s in seqs]))
        for seq, count in step.scheduled:
            manager.computed(seq, seq.num_computed_tokens, seq.num_computed_tokens + count)
            seq.num_computed_tokens += count
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(rng.randrange(3))
                if len(seq.output_token_ids) == 6:
                    seq.status = Status.FINISHED
                    scheduler.finish(seq)
                    finished.append(seq.seq_id)
    assert not scheduler.has_work()


def test_an_update_that_skips_blocks_is_refused() -> None:
    ranks = BlockTables(max_blocks_per_seq=8)
    ranks.apply([TableUpdate(1, 0, [3, 4])], [])
    with pytest.raises(ValueError, match="blocks from 3 sent, but this rank holds 2"):
        ranks.apply([TableUpdate(1, 3, [5])], [])
    with pytest.raises(ValueError, match="more than the 8"):
        ranks.apply([TableUpdate(2, 0, list(range(1, 10)))], [])
