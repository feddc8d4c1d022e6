"""The output processor: the engine core's new token ids become `RequestOutput`s.

Per completion it detokenizes incrementally (`driver.engine.tokenizer.IncrementalDetokenizer`), turns
the ranks' logprobs into vLLM's `Logprob` entries, and looks for stop strings: a completion
whose text reaches one ends here, and `process` says so, so that the core ends it too before
its next step. While a completion runs, the text that could still become a stop string is held
back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from driver.engine.core import CoreOutput, SeqDelta
from driver.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from driver.engine.tokenizer import IncrementalDetokenizer
from workers.batch import PromptLogprobs
from workers.faults import InjectedFault, wants_fault
from workers.sampling_params import SamplingParams

StopStringHit = tuple[str, int, str]
"""(request id, completion index, the stop string): a completion the core must end."""
RequestFailure = tuple[str, str]
"""(request id, what failed): a request whose own output failed here; the core must end it."""


@dataclass(eq=False)
class CompletionState:
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float
    ) -> None:
        completions = []
        for index in range(params.n):
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
                )
                if wants_fault(params, "detokenize"):
                    detokenizer = _FailingDetokenizer()
            state = CompletionState(index, detokenizer)
            if params.logprobs is not None:
                state.logprobs, state.cumulative_logprob = [], 0.0
            completions.append(state)
        prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self.requests[request_id] = RequestState(
            request_id,
            prompt,
            list(prompt_token_ids),
            params,
            completions,
            RequestMetrics(arrival_time=arrival_time),
            prompt_logprobs,
        )

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.requests.pop(request_id, None)

    def process(
        self, outputs: list[CoreOutput], finished_only: bool = False
    ) -> tuple[list[RequestOutput], list[StopStringHit], list[RequestFailure]]:
        """The touched requests' outputs (only the finished ones with `finished_only`: nobody
        streams them), the completions that reached a stop string in this step, and the
        requests whose output failed here (detokenizing, logprobs): those end with "error", the
        others go on."""
        results, hits, failures = [], [], []
        for out in outputs:
            request = self.requests.get(out.request_id)
            if request is None:
                continue
            try:
                hits.extend(self._apply(request, out))
            except Exception as exc:
                failures.append((request.request_id, f"its output failed: {type(exc).__name__}: {exc}"))
                self._fail(request, failures[-1][1])
            request.metrics = out.metrics or request.metrics
            if request.finished:
                request.metrics.finished_time = request.metrics.finished_time or time.time()
                del self.requests[request.request_id]
            if request.finished or not finished_only:
                results.append(self.output(request))
        return results, hits, failures

    def _apply(self, request: RequestState, out: CoreOutput) -> list[StopStringHit]:
        """One step's changes to a request; the stop strings its completions reached."""
        hits = []
        if out.error is not None:
            self._fail(request, out.error)
            return hits
        for entry in out.prompt_logprobs:
            self._add_prompt_logprobs(request, entry)
        for delta in out.seqs:
            hit = self._append(request, request.completions[delta.index], delta)
            if hit is not None:
                hits.append((request.request_id, delta.index, hit))
        return hits

    @staticmethod
    def _fail(request: RequestState, error: str) -> None:
        request.error = error
        for state in request.completions:
            if state.finish_reason is None:
                state.finish_reason = "error"

    def _append(self, request: RequestState, state: CompletionState, delta: SeqDelta) -> str | None:
        """Add the sampled token; the stop string it completed, if one."""
        token = delta.sampled
        state.token_ids.append(token.token_id)
        if state.logprobs is not None:
            state.logprobs.append(self._logprob_entry(token.token_id, token.logprob, token.rank, token.top))
            state.cumulative_logprob += token.logprob
        searched = len(state.text)
        if state.detokenizer is not None:
            state.text += state.detokenizer.add(token.token_id)
        hit = None
        if delta.finish_reason != "stop" and len(state.token_ids) >= request.params.min_tokens:
            hit = self._match_stop_string(state, request.params, searched)
        if hit is not None:
            state.finish_reason, state.stop_reason = "stop", hit
        elif delta.finish_reason is not None:
            state.finish_reason, state.stop_reason = delta.finish_reason, delta.stop_reason
            if state.detokenizer is not None:
                state.text += state.detokenizer.finish()
        return hit

    @staticmethod
    def _match_stop_string(state: CompletionState, params: SamplingParams, searched: int) -> str | None:
        """The first stop string that ends in the text added since length `searched` (however long
        that is); the text is cut before it (or after it)."""
        if not params.stop:
            return None
        tail_start = max(0, searched - max(len(s) for s in params.stop) + 1)
        best = None
        for stop in params.stop:
            at = state.text.find(stop, tail_start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        state.text = state.text[: at + len(stop)] if params.include_stop_str_in_output else state.text[:at]
        return stop

    def _add_prompt_logprobs(self, request: RequestState, entry: PromptLogprobs) -> None:
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

    def output(self, request: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=c.index,
                text=_visible_text(c, request.params),
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in request.completions
        ]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            outputs=completions,
            finished=request.finished,
            metrics=request.metrics,
            error=request.error,
        )


class _FailingDetokenizer:
    """A detokenizer that fails (`workers.faults`: a test asked for it)."""

    def add(self, token_id: int) -> str:
        raise InjectedFault("a test asked this request's detokenization to fail")

    def finish(self) -> str:
        return ""


def _visible_text(state: CompletionState, params: SamplingParams) -> str:
    """While a completion runs, hold back what could still become a stop string."""
    if state.finish_reason is not None or not params.stop:
        return state.text
    hold = max(len(s) for s in params.stop) - 1
    return state.text[: max(0, len(state.text) - hold)]
