"""Requests and their sequences (one per completion) as the engine core tracks them: token ids,
blocks, status; their text and logprobs are the output processor's."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from driver.engine.outputs import RequestMetrics
from workers.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion: its tokens, how many of them the KV cache holds, and its blocks."""

    seq_id: int
    request: Request
    index: int
    seed: int | None
    output_token_ids: list[int] = field(default_factory=list)
    pending: int = 0
    """Placeholders at the end of output_token_ids: tokens the steps in flight are sampling."""
    num_computed_tokens: int = 0
    """Tokens whose keys and values are in the cache (reset to 0 on preemption: recompute)."""
    block_table: list[int] = field(default_factory=list)
    blocks_sent: int = 0
    """How much of block_table the ranks hold (0 again after preemption: it is sent whole)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of its full blocks so far, first to last (kept through preemption)."""
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    announced: bool = False
    """Whether rank 0 has been sent this sequence's sampling state."""

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        prompt, n = self.request.prompt_token_ids, len(self.request.prompt_token_ids)
        if stop <= n:
            return prompt[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return prompt[start:] + self.output_token_ids[: stop - n]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    eos_token_id: int | None = None
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs_scored: int = 0
    """With prompt logprobs: how many prompt tokens have theirs (the first has none: 1 at the start)."""
    error: str | None = None
    """Why the request failed, when a failure of its own ended it."""

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
