"""The step messages between the driver and the workers: one `Batch` goes to every rank each step,
one `StepResult` comes back from rank 0."""

from __future__ import annotations

import msgspec

from workers.sampling_params import SamplingParams

PLACEHOLDER = -1
"""A token id in `Batch.token_ids` that stands for the token the step before is still sampling
for that sequence (async scheduling); the ranks fill it in (`workers.placeholders`)."""


class NewSequence(msgspec.Struct, frozen=True, kw_only=True):
    """What rank 0 keeps about a sequence for sampling, sent the first time it is scheduled."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    """This sequence's own seed (the request's, made distinct per completion when n > 1)."""
    stop_ids: list[int]
    """Token ids that min_tokens keeps from ending the sequence early (end of sequence, stop_token_ids)."""


class TableUpdate(msgspec.Struct, frozen=True, array_like=True):
    """A change to one sequence's block table: from index `start` on, it is `blocks` (start 0:
    the whole table, for a sequence new to the ranks or resumed after preemption)."""

    seq_id: int
    start: int
    blocks: list[int]


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """One step's work, the same message for every rank. Sequences come decodes first (one new
    token each), then chunks of prompts.

    For sequence i, the new tokens `token_ids[sum(query_lens[:i]) : ...]` sit at positions
    context_lens[i] - query_lens[i] ... context_lens[i] - 1, in the cache blocks of its block
    table. The ranks keep every table between steps (`workers.block_tables`): a batch carries
    only the blocks added since the last one (`table_updates`).
    """

    seq_ids: list[int]
    token_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]
    table_updates: list[TableUpdate] = []
    num_decodes: int
    sample: list[bool]
    """Whether this chunk ends the sequence's known tokens, so that a next token is sampled."""
    prompt_logprob_counts: list[int]
    """How many of the chunk's first positions want prompt logprobs (each predicts the next prompt token)."""
    new_seqs: list[NewSequence] = []
    finished_seq_ids: list[int] = []
    """Sequences rank 0 may forget (finished or aborted)."""


class SampledToken(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    seq_id: int
    token_id: int
    logprob: float | None = None
    rank: int | None = None
    """1-based rank of the chosen token in the distribution (with logprobs)."""
    top: list[tuple[int, float]] | None = None
    """The most likely tokens and their logprobs, best first (with logprobs)."""


class PromptLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    seq_id: int
    start: int
    """Prompt position of the first token these entries are for (>= 1)."""
    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


class FailedSample(msgspec.Struct, frozen=True, array_like=True):
    """A sequence whose sampling failed in a step (its own parameters, its own rows): the
    request ends with this error, and the others in the step go on."""

    seq_id: int
    error: str


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    sampled: list[SampledToken] = []
    """One token per sampling sequence; a failed one's is a stand-in (0) that fills its
    placeholder in a step already sent, and which the driver drops."""
    prompt_logprobs: list[PromptLogprobs] = []
    failed: list[FailedSample] = []
