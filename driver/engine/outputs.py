"""What `LLM.generate` returns, in vLLM's shapes."""

from __future__ import annotations

import msgspec


class Logprob(msgspec.Struct, kw_only=True):
    logprob: float
    rank: int | None = None
    """1-based rank of the token in the distribution."""
    decoded_token: str | None = None


class CompletionOutput(msgspec.Struct, kw_only=True):
    index: int
    """Which of the request's n completions this is."""
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    """Sum of the chosen tokens' logprobs (with SamplingParams.logprobs)."""
    logprobs: list[dict[int, Logprob]] | None = None
    """Per generated token: the top tokens and the chosen one (with SamplingParams.logprobs)."""
    finish_reason: str | None = None
    """"stop" (end of sequence, a stop string or stop token), "length" (max_tokens or max_model_len),
    "abort", or "error" (a failure of this request alone ended it: `RequestOutput.error` says which)."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it, if one did."""

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestMetrics(msgspec.Struct, kw_only=True):
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


class RequestOutput(msgspec.Struct, kw_only=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    """Why the request failed, when a failure of its own (its sampling on the device, its
    detokenization) ended it; the engine and the other requests go on."""
