"""Continuous batching: which sequences run this step, and how many tokens each computes.

Each step gets at most max_num_batched_tokens tokens. Running sequences go first, oldest
first: a decode computes one token, a prompt a chunk of what is left. When the pool has no block
for a sequence, the newest running sequence is preempted (its blocks freed, to be recomputed
when readmitted, from the longest prefix still cached). Then, if nobody was preempted, waiting
sequences are admitted in arrival order while tokens, blocks and max_num_seqs allow, each from
its longest cached prefix (`BlockManager`), except requests that ask for prompt logprobs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from driver.engine.block_manager import BlockManager
from driver.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, tokens it computes this step), decodes (one token) first."""
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, skip: Callable[[Sequence], bool] | None = None) -> ScheduledStep:
        """`skip`: running sequences to leave out of this step (they keep their blocks)."""
        step = ScheduledStep()
        budget = self._schedule_running(step, self.max_num_batched_tokens, skip)
        if not step.preempted:
            self._admit_waiting(step, budget)
        step.scheduled.sort(key=lambda item: item[1] > 1)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int, skip: Callable[[Sequence], bool] | None) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if skip is not None and skip(seq):
                i += 1
                continue
            count = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_grow(seq, seq.num_computed_tokens + count):
                victim = self.running.pop()
                self._preempt(victim, step)
                if victim is seq:
                    return budget
            self.blocks.grow(seq, seq.num_computed_tokens + count)
            step.scheduled.append((seq, count))
            budget -= count
            i += 1
        return budget

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._sibling_computing_prompt(seq):
                return  # admitted next step, from the prompt blocks its sibling is caching now
            prefix = [] if seq.request.params.prompt_logprobs is not None else self.blocks.cached_prefix(seq)
            start = len(prefix) * self.blocks.block_size
            count = min(seq.num_tokens - start, budget)
            if not self.blocks.can_take(seq, prefix, start + count):
                return
            self.waiting.popleft()
            seq.num_computed_tokens = self.blocks.take(seq, prefix)
            self.blocks.grow(seq, seq.num_computed_tokens + count)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.scheduled.append((seq, count))
            budget -= count

    def _sibling_computing_prompt(self, seq: Sequence) -> bool:
        """Whether, with prefix caching, another completion of `seq`'s request (n > 1) is still
        computing the prompt's full blocks, which `seq` will then share instead of recomputing."""
        if not self.blocks.enable_prefix_caching or len(seq.request.seqs) == 1:
            return False
        full = len(seq.prompt_token_ids) // self.blocks.block_size * self.blocks.block_size
        return any(
            other is not seq and other.status is Status.RUNNING and other.num_computed_tokens < full for other in seq.request.seqs
        )

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.blocks.release(seq)
        seq.num_computed_tokens = seq.blocks_sent = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
