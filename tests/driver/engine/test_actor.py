"""The engine's own checks (driver/engine/actor.py) that need no ranks."""

from __future__ import annotations

import pytest

from driver.engine.actor import check_requested_length
from driver.engine.core import CoreRequest
from workers.sampling_params import SamplingParams


def request(prompt_len: int, max_tokens: int | None) -> CoreRequest:
    params = SamplingParams(max_tokens=max_tokens)
    return CoreRequest(request_id="r", prompt_token_ids=[1] * prompt_len, params=params, arrival_time=0.0, eos_token_id=None)


def test_a_prompt_and_max_tokens_past_max_model_len_names_both() -> None:
    check_requested_length(request(10, 22), 32, "prompt")  # exactly full: fine
    check_requested_length(request(31, None), 32, "prompt")  # None: up to max_model_len
    with pytest.raises(ValueError) as caught:
        check_requested_length(request(10, 23), 32, "messages")
    assert str(caught.value) == (
        "This model's maximum context length is 32 tokens. However, you requested 33 tokens (10 in the messages, "
        "23 in the completion). Please reduce the length of the messages or completion."
    )
