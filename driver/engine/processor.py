"""The processor: prompts become the engine core's requests. Tokenizing and every check of a
prompt and its sampling parameters against the model happen here, once, for every entry point."""

from __future__ import annotations

from typing import Any

from driver.engine.core import CoreRequest
from workers.config import EngineConfig
from workers.sampling_params import SamplingParams

PromptRequest = tuple[str, str | None, list[int] | None, SamplingParams]
"""(request id, text, token ids, params): text or token ids (token ids win where both are given)."""


class Processor:
    def __init__(self, config: EngineConfig, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = config.model.max_model_len
        self.vocab_size = config.model.arch.vocab_size
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None

    def process(self, requests: list[PromptRequest], arrival_time: float) -> list[CoreRequest]:
        """Each request's token ids, checked; a ValueError names the first bad prompt, and then
        none of them is queued."""
        out = []
        for request_id, text, token_ids, params in requests:
            if token_ids is None:
                token_ids = self._tokenize(text)
            where = f"prompt {request_id!r}" if text is None else f"prompt {_preview(text)}"
            self.check_prompt(token_ids, where)
            self.check_params(params, where)
            out.append(
                CoreRequest(
                    request_id=request_id,
                    prompt_token_ids=list(token_ids),
                    params=params,
                    arrival_time=arrival_time,
                    eos_token_id=self.eos_token_id,
                )
            )
        return out

    def _tokenize(self, text: str | None) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine started with skip_tokenizer_init=True: give prompts as token ids")
        return self.tokenizer(text)["input_ids"]

    def check_prompt(self, prompt_token_ids: list[int], where: str = "the prompt") -> None:
        """Refuse, with the numbers, a prompt that is empty, that leaves no room to generate, or
        that holds ids outside the vocabulary."""
        if not prompt_token_ids:
            raise ValueError(f"{where} is empty: give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"{where} has {len(prompt_token_ids)} tokens, and max_model_len is {self.max_model_len}: a prompt "
                f"must be shorter than max_model_len to leave room for one generated token; shorten it or raise max_model_len"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def check_params(self, params: SamplingParams, where: str) -> None:
        """Refuse what SamplingParams cannot know alone: token ids past the vocabulary."""
        for field, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or ()))):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{field} of {where} name token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def render_chat(
        self, conversations: list[list[dict]], chat_template: str | None, add_generation_prompt: bool, kwargs: dict
    ) -> list[list[int]]:
        """Each conversation through the tokenizer's chat template, as token ids."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this engine started with skip_tokenizer_init=True")
        rendered = []
        for messages in conversations:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
            rendered.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return rendered


def _preview(text: str, width: int = 40) -> str:
    """The start of a prompt's text, quoted, for naming it in an error."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")
