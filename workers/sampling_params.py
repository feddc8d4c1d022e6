"""`SamplingParams`: how to pick each next token and when to stop, with vLLM's names and meanings.

It travels with each new sequence to rank 0, which samples; the driver applies the stop
conditions. Invalid values raise ValueError when the object is made.
"""

from __future__ import annotations

from typing import Any

import msgspec

GREEDY_EPS = 1e-5
"""A temperature below this samples greedily (argmax)."""
MAX_LOGPROBS = 20


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    n: int = 1
    """Completions to generate for the prompt."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output: > 0 favours new tokens."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is already in the output."""
    repetition_penalty: float = 1.0
    """Logits of tokens in the prompt or output are divided by it when positive, multiplied when not."""
    temperature: float = 1.0
    """Logits are divided by it; 0 samples greedily."""
    top_p: float = 1.0
    """Sample from the smallest set of most likely tokens whose probability reaches top_p."""
    top_k: int = 0
    """Sample from the k most likely tokens; 0 or -1: all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Seeds this request's own random generator: the same seed gives the same text whatever else is batched."""
    stop: str | list[str] | None = None
    """Strings that end the completion; they are not part of its text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the completion (besides the end-of-sequence token)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    max_tokens: int | None = 16
    """The most tokens to generate; None: until max_model_len."""
    min_tokens: int = 0
    """Generate at least this many tokens before end-of-sequence or stop_token_ids may end it."""
    logprobs: int | None = None
    """Return the log-probabilities of this many most likely tokens at each step (and of the chosen one)."""
    prompt_logprobs: int | None = None
    """Return the log-probabilities of this many most likely tokens at each prompt position."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    include_stop_str_in_output: bool = False
    """Keep a matched stop string at the end of the text."""
    spaces_between_special_tokens: bool = True
    """Put a space between a special token and its neighbours in the text (when they are kept)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling, each in [-100, 100] (OpenAI's
    meaning: -100 bans a token, 100 all but forces it)."""
    extra_args: dict[str, Any] | None = None
    """Free-form arguments for custom code (vLLM's `vllm_xargs` arrive here); shardlm reads only
    its fault-injection key (workers/faults.py)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _token_biases(self.logit_bias)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be greater than 0, got {self.repetition_penalty}"),
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop}"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                f"stop_token_ids must be token ids, got {self.stop_token_ids}",
            ),
            (
                self.seed is None or -(2**63) <= self.seed < 2**63,
                f"seed must be a 64-bit integer, in [-2**63, 2**63), got {self.seed}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_logit_bias(self) -> bool:
        return bool(self.logit_bias)

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _token_biases(bias: dict | None) -> dict[int, float] | None:
    """logit_bias with int keys (JSON gives token ids as strings), each value checked."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative), got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100.0 <= value <= 100.0:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {token}")
        out[token] = float(value)
    return out
