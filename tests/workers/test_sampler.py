"""SamplingParams validation and the sampler's maths, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from workers.batch import NewSequence
from workers.sampler import Sampler, apply_top_k_top_p
from workers.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature must be non-negative"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be -1"),
        (dict(min_p=1.2), r"min_p must be in \[0, 1\]"),
        (dict(n=0), "n must be at least 1"),
        (dict(presence_penalty=3), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-2.5), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(repetition_penalty=0), "repetition_penalty must be greater than 0"),
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(min_tokens=5, max_tokens=3), r"min_tokens \(5\) must be at most max_tokens \(3\)"),
        (dict(logprobs=21), r"logprobs must be in \[0, 20\]"),
        (dict(prompt_logprobs=-1), "prompt_logprobs must be in"),
        (dict(stop=[""]), "stop strings must be non-empty"),
        (dict(seed=2**64), r"seed must be a 64-bit integer"),
    ],
)
def test_invalid_values_raise_value_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_normalised_fields() -> None:
    params = SamplingParams(stop="END", top_k=-1)
    assert params.stop == ["END"] and params.top_k == 0 and params.stop_token_ids == []
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def sampler_with(params: list[SamplingParams], prompts: list[list[int]] | None = None, seeds: list[int | None] | None = None) -> Sampler:
    sampler = Sampler(torch.device("cpu"), seed=0)
    for i, p in enumerate(params):
        seed = seeds[i] if seeds else p.seed
        sampler.add(NewSequence(seq_id=i, prompt_token_ids=(prompts or [[0]] * len(params))[i], params=p, seed=seed, stop_ids=[3]))
    return sampler


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0, 0.5]] * 4)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)]
    tokens = [s.token_id for s in sampler_with(params).sample(logits, [0, 1, 2, 3])]
    assert tokens == [1, 1, 1, 1]


def test_draws_follow_the_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    rows = 20000
    sampler = Sampler(torch.device("cpu"), seed=0)
    for i in range(rows):
        sampler.add(NewSequence(seq_id=i, prompt_token_ids=[0], params=SamplingParams(temperature=0.7), seed=None, stop_ids=[]))
    tokens = torch.tensor([s.token_id for s in sampler.sample(logits.expand(rows, 4).clone(), list(range(rows)))])
    freq = torch.bincount(tokens, minlength=4).float() / rows
    expected = (logits / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_top_k_top_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    masked = apply_top_k_top_p(logits.repeat(3, 1), [2, 0, 0], [1.0, 0.7, 0.86])
    kept = (masked > float("-inf")).tolist()
    assert kept[0] == [True, True, False, False, False]
    assert kept[1] == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept[2] == [True, True, True, True, False]   # 0.85 < 0.86: the 0.1 token is needed too


def test_seeded_sequences_ignore_their_batch() -> None:
    torch.manual_seed(3)
    steps = [torch.randn(4, 50) for _ in range(6)]
    alone = sampler_with([SamplingParams(seed=42)] * 1)
    crowd = sampler_with([SamplingParams(seed=7), SamplingParams(), SamplingParams(seed=42), SamplingParams(temperature=0.3)])
    ours = [alone.sample(step[2:3], [0])[0].token_id for step in steps]
    theirs = [crowd.sample(step, [0, 1, 2, 3])[2].token_id for step in steps]
    assert ours == theirs
    other = sampler_with([SamplingParams(seed=43)])
    assert [other.sample(step[2:3], [0])[0].token_id for step in steps] != ours


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampler = sampler_with([params], prompts=[[0]])
    state = sampler.states[0]
    state.output_ids.extend([1, 3, 3])
    from workers.sampler import apply_penalties

    got = apply_penalties(logits.clone(), [state])[0]
    expected = torch.tensor([
        2.0 / 2.0,                          # in the prompt: repetition only
        -1.0 * 2.0 - 0.5 * 1 - 0.25,        # output once, negative logit: multiplied
        0.5,                                # unseen
        1.0 / 2.0 - 0.5 * 2 - 0.25,         # output twice
        0.0,
    ])
    torch.testing.assert_close(got, expected)


def test_min_tokens_keeps_stop_ids_out() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 10.0]])
    sampler = sampler_with([SamplingParams(temperature=0, min_tokens=2)])
    assert sampler.sample(logits, [0])[0].token_id != 3
    assert sampler.sample(logits, [0])[0].token_id != 3
    assert sampler.sample(logits, [0])[0].token_id == 3


def test_logprobs_are_the_models_own() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    sampler = sampler_with([SamplingParams(temperature=0, logprobs=2, repetition_penalty=2.0)], prompts=[[1]])
    token = sampler.sample(logits, [0])[0]
    raw = logits[0].log_softmax(-1)
    assert token.token_id == 2  # the penalty moved the choice off token 1 ...
    assert math.isclose(token.logprob, float(raw[2]), rel_tol=1e-6)  # ... but logprobs are of the raw logits
    assert token.rank == 2
    assert [t for t, _ in token.top] == [1, 2] and math.isclose(token.top[0][1], float(raw[1]), rel_tol=1e-6)


def test_prompt_logprobs() -> None:
    sampler = sampler_with([SamplingParams(prompt_logprobs=1)], prompts=[[5, 2, 0, 1]])
    logits = torch.randn(2, 6)
    entry = sampler.prompt_logprobs(logits, 0, start=1)  # positions 0 and 1 predict prompt tokens 1 and 2
    raw = logits.log_softmax(-1)
    assert entry.start == 1
    assert entry.logprobs == pytest.approx([float(raw[0, 2]), float(raw[1, 0])], rel=1e-6)
    assert [top[0][0] for top in entry.top] == raw.argmax(-1).tolist()
