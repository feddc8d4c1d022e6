"""The engine core: requests as token ids in, one `Batch` per step to every rank, new token ids out.

It holds the scheduler and the block manager and runs the step; it has no tokenizer. Text comes
in through the processor (`driver.engine.processor`) and goes out through the output processor
(`driver.engine.output_processor`), which also finds stop strings and tells the core to end those
sequences (`finish`) before the next step is scheduled.

The core ends a sequence itself on what token ids alone decide: end of sequence, a stop token,
max_tokens, max_model_len.

A step is two halves: `schedule` plans it and sends it to the ranks, `complete` waits for its
result and applies it. With async scheduling the driver actor schedules step N+1 while the ranks
still run step N: a completion whose token from step N is not known yet gets a placeholder
(`PLACEHOLDER`), which the ranks replace with the token they sampled; when step N's token ends
the completion, step N+1 computed one token too many, which `complete` drops unseen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from driver.engine.block_manager import BlockManager
from driver.engine.outputs import RequestMetrics
from driver.engine.scheduler import ScheduledStep, Scheduler
from driver.engine.sequence import Request, Sequence, Status
from workers.batch import PLACEHOLDER, Batch, NewSequence, PromptLogprobs, SampledToken, StepResult, TableUpdate
from workers.config import EngineConfig
from workers.sampling_params import SamplingParams


class CoreRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request as the core takes it: validated token ids (`driver.engine.processor` made it)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_id: int | None = None
    """The tokenizer's end-of-sequence id (None: only stop_token_ids and lengths end it)."""


@dataclass
class SeqDelta:
    """What one step did to one completion."""

    index: int
    sampled: SampledToken | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None


@dataclass
class CoreOutput:
    """One request a step touched: its completions' new tokens, its new prompt logprobs."""

    request_id: str
    seqs: list[SeqDelta] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    """A copy of the request's timings after this step."""
    error: str | None = None
    """Why the request failed in this step (its completions then end with "error")."""


@dataclass
class InFlight:
    """A step sent to the ranks: what it computes, and how to wait for rank 0's result."""

    scheduled: list[tuple[Sequence, int, int]]
    """(sequence, first position, end position) of each scheduled chunk."""
    result: Callable[[], StepResult]


Submit = Callable[[Batch], Callable[[], StepResult]]
"""Sends a Batch to every rank; the callable it returns waits for rank 0's result."""


class EngineCore:
    def __init__(self, config: EngineConfig, num_blocks: int, submit: Submit) -> None:
        self.config, self.submit = config, submit
        self.max_model_len = config.model.max_model_len
        sched = config.scheduler
        blocks = BlockManager(num_blocks, config.cache.block_size, enable_prefix_caching=config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(blocks, sched.max_num_seqs, sched.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self.next_seq_id = 0
        self.to_forget: list[int] = []
        self.steps = self.preemptions = 0
        self.prompt_tokens = self.generation_tokens = 0
        """Prompt tokens of requests that have had their first token, and tokens generated."""
        self.async_scheduling = sched.async_scheduling
        self.in_flight: InFlight | None = None
        """With async scheduling: the step the ranks are running."""

    # -- requests ---------------------------------------------------------------------------

    def add_requests(self, requests: list[CoreRequest]) -> None:
        """Queue every request, or none when an id is already in use (or given twice)."""
        ids = [r.request_id for r in requests]
        for request_id in ids:
            if request_id in self.requests or ids.count(request_id) > 1:
                raise ValueError(f"request id {request_id!r} is already in use")
        for request in requests:
            self._add(request)

    def _add(self, core: CoreRequest) -> None:
        params = core.params
        request = Request(
            core.request_id,
            list(core.prompt_token_ids),
            params,
            RequestMetrics(arrival_time=core.arrival_time),
            core.eos_token_id,
        )
        for index in range(params.n):
            seq = Sequence(self.next_seq_id, request, index, _seed(params.seed, index))
            self.next_seq_id += 1
            request.seqs.append(seq)
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs_scored = 1
        self.requests[core.request_id] = request

    def abort(self, request_ids: list[str]) -> None:
        """End these requests now (unknown ids are ignored)."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.finished:
                    self._finish(seq, "abort")
            self._drop(request)

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        """End completion `index` of a request (a stop string matched); the request goes once
        all its completions have ended."""
        request = self.requests.get(request_id)
        if request is None:
            return
        seq = request.seqs[index]
        if not seq.finished:
            self._finish(seq, reason, stop_reason)
        if request.finished:
            self._drop(request)

    def fail(self, request_id: str, error: str) -> None:
        """End every completion of a request with "error" (a failure that is this request's
        alone, found in the driver: its detokenization); unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            self._fail(request, error)
            self._drop(request)

    def _fail(self, request: Request, error: str) -> None:
        request.error = error
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq, "error")

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.in_flight is not None

    def blocked(self) -> str | None:
        """Why nothing can be scheduled although requests are unfinished (None: something can,
        or nothing is left). The step that finds this returns no output; the engine then waits
        for a new request or an abort instead of stepping again."""
        if self.in_flight is not None or not self.requests or self.scheduler.running:
            return None
        if not self.scheduler.waiting:
            return f"{len(self.requests)} request(s) hold no running or waiting completion"
        seq = self.scheduler.waiting[0]
        blocks = self.scheduler.blocks
        return (
            f"request {seq.request.request_id!r} waits for KV blocks for {seq.num_tokens} tokens, and "
            f"{blocks.num_free} of the pool's blocks are free"
        )

    def metric_counts(self) -> dict[str, float]:
        """The figures `driver.engine.metrics` reads: totals since start, and the queues now."""
        blocks = self.scheduler.blocks
        running = {seq.request.request_id for seq in self.scheduler.running}
        waiting = {seq.request.request_id for seq in self.scheduler.waiting} - running
        return {
            "num_requests_running": len(running),
            "num_requests_waiting": len(waiting),
            "kv_cache_usage_perc": 1.0 - blocks.num_free / blocks.num_blocks if blocks.num_blocks else 0.0,
            "prefix_cache_queries": blocks.queried_tokens,
            "prefix_cache_hits": blocks.hit_tokens,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "num_preemptions": self.preemptions,
        }

    def stats(self) -> dict[str, int | float]:
        """Counters since start: steps run, sequences preempted, prompt tokens looked up in the
        prefix cache and found there (and their ratio); the queues and blocks now."""
        return {
            "steps": self.steps,
            "preemptions": self.preemptions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": self.scheduler.blocks.num_free,
            **self.scheduler.blocks.stats(),
        }

    # -- a step -----------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """One step: the requests it touched. With async scheduling, the step after it is
        scheduled and sent before its result is awaited, and it is still running when this returns."""
        current = self.in_flight or self.schedule()
        if current is None:
            return []
        self.in_flight = self.schedule(overlap=True) if self.async_scheduling else None
        return self.complete(current)

    def schedule(self, overlap: bool = False) -> InFlight | None:
        """Plan a step and send it to the ranks (None: nothing to run). `overlap`: the step before
        it is still running, so a completion that step will certainly end (by max_tokens or
        max_model_len) is left out rather than computed in vain."""
        planned = self.scheduler.schedule(skip=self._ending if overlap else None)
        self.preemptions += len(planned.preempted)
        if not planned.scheduled:
            return None
        self.steps += 1
        batch, scheduled = self._batch(planned)
        return InFlight(scheduled, self.submit(batch))

    def _ending(self, seq: Sequence) -> bool:
        """Whether the token `seq` waits for ends it by length."""
        max_tokens = seq.request.params.max_tokens
        return seq.pending > 0 and (
            (max_tokens is not None and len(seq.output_token_ids) >= max_tokens) or seq.num_tokens >= self.max_model_len
        )

    def complete(self, step: InFlight) -> list[CoreOutput]:
        """Wait for a step's result and apply it: the requests it touched (completions that
        ended, or were aborted, since it was sent are left out)."""
        result = step.result()
        now = time.time()
        touched: dict[str, CoreOutput] = {}
        for seq, start, stop in step.scheduled:
            if seq.finished:
                continue
            if seq.status is Status.RUNNING:  # not preempted since
                self.scheduler.blocks.computed(seq, start, stop)
            touched.setdefault(seq.request.request_id, CoreOutput(seq.request.request_id))
        for failure in result.failed:  # before the tokens: a failed completion's token is a stand-in
            seq = self.seqs.get(failure.seq_id)
            if seq is not None and not seq.finished:
                self._fail(seq.request, failure.error)
                touched.setdefault(seq.request.request_id, CoreOutput(seq.request.request_id)).error = failure.error
        for entry in result.prompt_logprobs:
            seq = self.seqs.get(entry.seq_id)
            if seq is not None and seq.request.request_id in touched:
                touched[seq.request.request_id].prompt_logprobs.append(entry)
        for token in result.sampled:
            seq = self.seqs.get(token.seq_id)
            if seq is not None and not seq.finished:
                touched[seq.request.request_id].seqs.append(self._append(seq, token, now))
        for out in touched.values():
            request = self.requests[out.request_id]
            out.metrics = msgspec.structs.replace(request.metrics)
            if request.finished:
                self._drop(request)
        return list(touched.values())

    def _batch(self, planned: ScheduledStep) -> tuple[Batch, list[tuple[Sequence, int, int]]]:
        """The step's message, and (sequence, first position, end position) of each chunk. Each
        sequence counts its chunk as computed, and one that samples gets a placeholder for the
        token it samples."""
        now = time.time()
        scheduled = []
        fields: dict[str, list] = {
            k: []
            for k in ("seq_ids", "token_ids", "query_lens", "context_lens", "table_updates", "sample", "prompt_logprob_counts")
        }
        new_seqs = []
        for seq, count in planned.scheduled:
            start, stop = seq.num_computed_tokens, seq.num_computed_tokens + count
            fields["seq_ids"].append(seq.seq_id)
            fields["token_ids"].extend(seq.token_slice(start, stop))
            fields["query_lens"].append(count)
            fields["context_lens"].append(stop)
            update = table_update(seq)
            if update is not None:
                fields["table_updates"].append(update)
            samples = stop == seq.num_tokens
            fields["sample"].append(samples)
            scored = _prompt_logprob_count(seq, start, stop)
            seq.request.prompt_logprobs_scored += scored
            fields["prompt_logprob_counts"].append(scored)
            if not seq.announced:
                new_seqs.append(_announce(seq))
            seq.num_computed_tokens = stop
            if samples:  # its next token is a placeholder until this step's result comes
                seq.output_token_ids.append(PLACEHOLDER)
                seq.pending += 1
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
            scheduled.append((seq, start, stop))
        num_decodes = sum(1 for _, count in planned.scheduled if count == 1)
        forget, self.to_forget = self.to_forget, []
        batch = Batch(**fields, num_decodes=num_decodes, new_seqs=new_seqs, finished_seq_ids=forget)
        return batch, scheduled

    def _append(self, seq: Sequence, token: SampledToken, now: float) -> SeqDelta:
        metrics = seq.request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            self.prompt_tokens += len(seq.request.prompt_token_ids)
        self.generation_tokens += 1
        metrics.last_token_time = now
        seq.output_token_ids[len(seq.output_token_ids) - seq.pending] = token.token_id
        seq.pending -= 1
        delta = SeqDelta(seq.index, token)
        reason, stop_reason = self._stop_reason(seq, token.token_id)
        if reason is not None:
            self._finish(seq, reason, stop_reason)
            delta.finish_reason, delta.stop_reason = reason, stop_reason
        return delta

    def _stop_reason(self, seq: Sequence, token_id: int) -> tuple[str | None, int | None]:
        """Why `seq` stops after `token_id`, by token ids and lengths alone (stop strings are the
        output processor's)."""
        params, eos = seq.request.params, seq.request.eos_token_id
        generated = len(seq.output_token_ids) - seq.pending
        if generated >= params.min_tokens:
            if token_id == eos and not params.ignore_eos:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
        if params.max_tokens is not None and generated >= params.max_tokens:
            return "length", None
        if seq.num_tokens - seq.pending >= self.max_model_len:
            return "length", None
        return None, None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.pending:  # the tokens a step in flight computes for it are dropped
            del seq.output_token_ids[-seq.pending :]
            seq.pending = 0
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.scheduler.finish(seq)
        if seq.announced:
            self.to_forget.append(seq.seq_id)
        if seq.request.finished:
            seq.request.metrics.finished_time = time.time()

    def _drop(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            self.seqs.pop(seq.seq_id, None)


def _announce(seq: Sequence) -> NewSequence:
    seq.announced = True
    params, eos = seq.request.params, seq.request.eos_token_id
    stop_ids = list(params.stop_token_ids)
    if eos is not None and not params.ignore_eos:
        stop_ids.append(eos)
    return NewSequence(seq_id=seq.seq_id, prompt_token_ids=seq.prompt_token_ids, params=params, seed=seq.seed, stop_ids=stop_ids)


def _prompt_logprob_count(seq: Sequence, start: int, stop: int) -> int:
    """Positions of this chunk, from its start, whose next token is a prompt token not yet scored."""
    request = seq.request
    if request.params.prompt_logprobs is None or seq.index != 0:
        return 0
    if start + 1 != request.prompt_logprobs_scored:  # scored: prompt tokens 0 .. scored - 1
        return 0
    return max(0, min(stop, len(request.prompt_token_ids) - 1) - start)


def table_update(seq: Sequence) -> TableUpdate | None:
    """The blocks of `seq`'s table the ranks do not hold yet, as one update (None: none)."""
    sent, table = seq.blocks_sent, seq.block_table
    if len(table) == sent:
        return None
    seq.blocks_sent = len(table)
    return TableUpdate(seq.seq_id, sent, table[sent:])


def _seed(seed: int | None, index: int) -> int | None:
    """Completion `index`'s seed: the request's own for the first, distinct ones for the others."""
    if seed is None or index == 0:
        return seed
    return (seed * 1_000_003 + index * 7_919) % (2**63)
