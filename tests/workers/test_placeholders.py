"""Placeholder tokens (async scheduling): rank 0 fills them with what it sampled last."""

from __future__ import annotations

import pytest
import torch

from parallel.state import TensorParallelGroup
from workers.batch import PLACEHOLDER, Batch, SampledToken, StepResult
from workers.placeholders import LastTokens


def batch(seq_ids: list[int], token_ids: list[int], query_lens: list[int], finished: list[int] | None = None) -> Batch:
    return Batch(
        seq_ids=seq_ids,
        token_ids=token_ids,
        query_lens=query_lens,
        context_lens=[8] * len(seq_ids),
        num_decodes=sum(1 for q in query_lens if q == 1),
        sample=[True] * len(seq_ids),
        prompt_logprob_counts=[0] * len(seq_ids),
        finished_seq_ids=finished or [],
    )


def test_placeholders_take_each_sequences_last_sampled_token() -> None:
    last = LastTokens(TensorParallelGroup.single(), torch.device("cpu"))
    first = batch([1, 2], [5, 6], [1, 1])
    assert last.fill(first) is first  # nothing to fill
    last.record(first, StepResult(sampled=[SampledToken(seq_id=1, token_id=70_000), SampledToken(seq_id=2, token_id=9)]))
    filled = last.fill(batch([2, 1, 3], [PLACEHOLDER, PLACEHOLDER, 4, 5, 6], [1, 1, 3]))
    assert filled.token_ids == [9, 70_000, 4, 5, 6]
    last.record(batch([1], [3], [1], finished=[2]), None)
    with pytest.raises(RuntimeError, match="sequence 2, which has sampled nothing"):
        last.fill(batch([2], [PLACEHOLDER], [1]))
