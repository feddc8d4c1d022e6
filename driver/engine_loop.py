"""The engine loop: requests in, one `Batch` per step to the workers, tokens back, text and stop
conditions, `RequestOutput`s out."""

from __future__ import annotations

import time
from typing import Any, Callable

import msgspec

from driver.block_manager import BlockManager
from driver.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from driver.scheduler import Scheduler, ScheduledStep
from driver.sequence import Request, Sequence, Status
from driver.tokenizer import IncrementalDetokenizer
from workers.batch import Batch, NewSequence, PromptLogprobs, SampledToken, StepResult, TableUpdate
from workers.config import EngineConfig
from workers.sampling_params import SamplingParams


class EngineLoop:
    """Runs in the driver actor. `execute` sends a Batch to every rank and returns rank 0's result."""

    def __init__(self, config: EngineConfig, num_blocks: int, tokenizer: Any, execute: Callable[[Batch], StepResult]) -> None:
        self.config, self.tokenizer, self.execute = config, tokenizer, execute
        self.max_model_len = config.model.max_model_len
        sched = config.scheduler
        blocks = BlockManager(num_blocks, config.cache.block_size, enable_prefix_caching=config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(blocks, sched.max_num_seqs, sched.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self.next_seq_id = 0
        self.to_forget: list[int] = []
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.steps = self.preemptions = 0

    # -- requests ---------------------------------------------------------------------------

    def check_prompt(self, prompt_token_ids: list[int], where: str = "the prompt") -> None:
        """Refuse, with the numbers, a prompt that is empty or that leaves no room to generate."""
        if not prompt_token_ids:
            raise ValueError(f"{where} is empty: give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"{where} has {len(prompt_token_ids)} tokens, and max_model_len is {self.max_model_len}: a prompt "
                f"must be shorter than max_model_len to leave room for one generated token; shorten it or raise max_model_len"
            )
        vocab = self.config.model.arch.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def check_params(self, params: SamplingParams, where: str) -> None:
        """Refuse what SamplingParams cannot know alone: stop token ids past the vocabulary."""
        vocab = self.config.model.arch.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids of {where} lie outside the vocabulary [0, {vocab}): {bad[:5]}")

    def add_requests(self, requests: list[tuple[str, str | None, list[int], SamplingParams, str]], arrival_time: float) -> None:
        """Queue (id, text, token ids, params, how to name it in errors) for each request; every
        prompt and id is checked before any request is queued."""
        ids = [r[0] for r in requests]
        for request_id, _, token_ids, _, where in requests:
            if request_id in self.requests or ids.count(request_id) > 1:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.check_prompt(token_ids, where)
        for _, _, _, params, where in requests:
            self.check_params(params, where)
        for request_id, text, token_ids, params, _ in requests:
            self._add(request_id, text, token_ids, params, arrival_time)

    def _add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float) -> None:
        request = Request(request_id, prompt, list(prompt_token_ids), params, RequestMetrics(arrival_time=arrival_time))
        for index in range(params.n):
            seq = Sequence(self.next_seq_id, request, index, _seed(params.seed, index))
            self.next_seq_id += 1
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            request.seqs.append(seq)
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.requests[request_id] = request

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            for seq in request.seqs if request else []:
                if not seq.finished:
                    self._finish(seq, "abort")
                self.seqs.pop(seq.seq_id, None)

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

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Schedule, run the batch on every rank, apply the sampled tokens; the requests that
        changed (only those that finished, with `finished_only`: nobody streams them)."""
        planned = self.scheduler.schedule()
        self.preemptions += len(planned.preempted)
        if not planned.scheduled:
            return []
        self.steps += 1
        now = time.time()
        batch = self._batch(planned)
        result = self.execute(batch)
        touched: dict[str, Request] = {}
        for seq, count in planned.scheduled:
            self.scheduler.blocks.computed(seq, seq.num_computed_tokens, seq.num_computed_tokens + count)
            seq.num_computed_tokens += count
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
            touched[seq.request.request_id] = seq.request
        for entry in result.prompt_logprobs:
            self._add_prompt_logprobs(self.seqs[entry.seq_id].request, entry)
        for token in result.sampled:
            self._append(self.seqs[token.seq_id], token)
        outputs = [self.output(r) for r in touched.values() if r.finished or not finished_only]
        for request in touched.values():
            if request.finished:
                del self.requests[request.request_id]
                for seq in request.seqs:
                    self.seqs.pop(seq.seq_id, None)
        return outputs

    def _batch(self, planned: ScheduledStep) -> Batch:
        fields: dict[str, list] = {k: [] for k in ("seq_ids", "token_ids", "query_lens", "context_lens", "table_updates", "sample", "prompt_logprob_counts")}
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
            fields["prompt_logprob_counts"].append(self._prompt_logprob_count(seq, start, stop))
            if not seq.announced:
                new_seqs.append(self._announce(seq))
        num_decodes = sum(1 for _, count in planned.scheduled if count == 1)
        forget, self.to_forget = self.to_forget, []
        return Batch(**fields, num_decodes=num_decodes, new_seqs=new_seqs, finished_seq_ids=forget)

    def _announce(self, seq: Sequence) -> NewSequence:
        seq.announced = True
        params = seq.request.params
        stop_ids = list(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop_ids.append(self.eos_token_id)
        return NewSequence(seq_id=seq.seq_id, prompt_token_ids=seq.prompt_token_ids, params=params, seed=seq.seed, stop_ids=stop_ids)

    def _prompt_logprob_count(self, seq: Sequence, start: int, stop: int) -> int:
        """Positions of this chunk, from its start, whose next token is a prompt token not yet scored."""
        request = seq.request
        if request.prompt_logprobs is None or seq.index != 0:
            return 0
        scored = len(request.prompt_logprobs)  # entries for prompt tokens 0 .. scored - 1
        if start + 1 != scored:
            return 0
        return max(0, min(stop, len(request.prompt_token_ids) - 1) - start)

    # -- results ----------------------------------------------------------------------------

    def _append(self, seq: Sequence, token: SampledToken) -> None:
        now = time.time()
        metrics = seq.request.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        seq.output_token_ids.append(token.token_id)
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(token.token_id, token.logprob, token.rank, token.top))
            seq.cumulative_logprob += token.logprob
        searched = len(seq.text)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(token.token_id)
        reason, stop_reason = self._stop_reason(seq, token.token_id, searched)
        if reason is not None:
            self._finish(seq, reason, stop_reason)

    def _stop_reason(self, seq: Sequence, token_id: int, searched: int) -> tuple[str | None, int | str | None]:
        """Why `seq` stops after `token_id`, if it does; `searched`: the text's length before it."""
        params = seq.request.params
        generated = len(seq.output_token_ids)
        if generated >= params.min_tokens:
            if token_id == self.eos_token_id and not params.ignore_eos:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
            matched = self._match_stop_string(seq, searched)
            if matched is not None:
                return "stop", matched
        if params.max_tokens is not None and generated >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _match_stop_string(self, seq: Sequence, searched: int) -> str | None:
        """The first stop string that ends in the text added since length `searched` (however long
        that is); the text is cut before it (or after it)."""
        params = seq.request.params
        if not params.stop:
            return None
        tail_start = max(0, searched - max(len(s) for s in params.stop) + 1)
        best = None
        for stop in params.stop:
            at = seq.text.find(stop, tail_start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        seq.text = seq.text[: at + len(stop)] if params.include_stop_str_in_output else seq.text[:at]
        return stop

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.detokenizer is not None and reason != "abort" and not isinstance(stop_reason, str):
            seq.text += seq.detokenizer.finish()
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.scheduler.finish(seq)
        if seq.announced:
            self.to_forget.append(seq.seq_id)
        if seq.request.finished:
            seq.request.metrics.finished_time = time.time()

    def _add_prompt_logprobs(self, request: Request, entry: PromptLogprobs) -> None:
        targets = request.prompt_token_ids[entry.start : entry.start + len(entry.logprobs)]
        for token, lp, rank, top in zip(targets, entry.logprobs, entry.ranks, entry.top):
            request.prompt_logprobs.append(self._logprob_entry(token, lp, rank, top))

    def _logprob_entry(self, token: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> dict[int, Logprob]:
        entry = {t: Logprob(logprob=lp, rank=i + 1, decoded_token=self._decode_one(t)) for i, (t, lp) in enumerate(top)}
        if token not in entry:
            entry[token] = Logprob(logprob=logprob, rank=rank, decoded_token=self._decode_one(token))
        return entry

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=self._visible_text(seq),
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in request.seqs
        ]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            outputs=completions,
            finished=request.finished,
            metrics=msgspec.structs.replace(request.metrics),
        )

    @staticmethod
    def _visible_text(seq: Sequence) -> str:
        """While a sequence runs, hold back what could still become a stop string."""
        stops = seq.request.params.stop
        if seq.finished or not stops:
            return seq.text
        hold = max(len(s) for s in stops) - 1
        return seq.text[: max(0, len(seq.text) - hold)]


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

