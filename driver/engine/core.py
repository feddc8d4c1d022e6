"""The engine core: requests as token ids in, one `Batch` per step to every rank, new token ids out.

It holds the scheduler and the block manager and runs the step; it has no tokenizer. Text comes
in through the processor (`driver.engine.processor`) and goes out through the output processor
(`driver.engine.output_processor`), which also finds stop strings and tells the core to end those
sequences (`finish`) before the next step is scheduled.

The core ends a sequence itself on what token ids alone decide: end of sequence, a stop token,
max_tokens, max_model_len.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from driver.engine.block_manager import BlockManager
from driver.engine.outputs import RequestMetrics
from driver.engine.scheduler import ScheduledStep, Scheduler
from driver.engine.sequence import Request, Sequence, Status
from workers.batch import Batch, NewSequence, PromptLogprobs, SampledToken, StepResult, TableUpdate
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


class EngineCore:
    """`execute` sends a Batch to every rank and returns rank 0's result."""

    def __init__(self, config: EngineConfig, num_blocks: int, execute: Callable[[Batch], StepResult]) -> None:
        self.config, self.execute = config, execute
        self.max_model_len = config.model.max_model_len
        sched = config.scheduler
        blocks = BlockManager(num_blocks, config.cache.block_size, enable_prefix_caching=config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(blocks, sched.max_num_seqs, sched.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self.next_seq_id = 0
        self.to_forget: list[int] = []
        self.steps = self.preemptions = 0

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
            core.request_id, list(core.prompt_token_ids), params, RequestMetrics(arrival_time=core.arrival_time), core.eos_token_id
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
            request = self.requests.pop(request_id, None)
            for seq in request.seqs if request else []:
                if not seq.finished:
                    self._finish(seq, "abort")
                self.seqs.pop(seq.seq_id, None)

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

    def has_unfinished(self) -> bool:
        return bool(self.requests)

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
        """Schedule, run the batch on every rank, apply the sampled tokens: the requests touched."""
        planned = self.scheduler.schedule()
        self.preemptions += len(planned.preempted)
        if not planned.scheduled:
            return []
        self.steps += 1
        now = time.time()
        result = self.execute(self._batch(planned))
        touched: dict[str, CoreOutput] = {}
        for seq, count in planned.scheduled:
            self.scheduler.blocks.computed(seq, seq.num_computed_tokens, seq.num_computed_tokens + count)
            seq.num_computed_tokens += count
            request = seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            touched.setdefault(request.request_id, CoreOutput(request.request_id))
        for entry in result.prompt_logprobs:
            request = self.seqs[entry.seq_id].request
            request.prompt_logprobs_scored += len(entry.logprobs)
            touched[request.request_id].prompt_logprobs.append(entry)
        for token in result.sampled:
            seq = self.seqs[token.seq_id]
            touched[seq.request.request_id].seqs.append(self._append(seq, token))
        for out in touched.values():
            request = self.requests[out.request_id]
            out.metrics = msgspec.structs.replace(request.metrics)
            if request.finished:
                self._drop(request)
        return list(touched.values())

    def _batch(self, planned: ScheduledStep) -> Batch:
        fields: dict[str, list] = {
            k: [] for k in ("seq_ids", "token_ids", "query_lens", "context_lens", "table_updates", "sample", "prompt_logprob_counts")
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
            fields["sample"].append(stop == seq.num_tokens)
            fields["prompt_logprob_counts"].append(_prompt_logprob_count(seq, start, stop))
            if not seq.announced:
                new_seqs.append(_announce(seq))
        num_decodes = sum(1 for _, count in planned.scheduled if count == 1)
        forget, self.to_forget = self.to_forget, []
        return Batch(**fields, num_decodes=num_decodes, new_seqs=new_seqs, finished_seq_ids=forget)

    def _append(self, seq: Sequence, token: SampledToken) -> SeqDelta:
        now = time.time()
        metrics = seq.request.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        seq.output_token_ids.append(token.token_id)
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
        generated = len(seq.output_token_ids)
        if generated >= params.min_tokens:
            if token_id == eos and not params.ignore_eos:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
        if params.max_tokens is not None and generated >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
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
