"""SamplingParams validation and the sampler's maths, against their definitions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.batch import NewSequence, PromptLogprobs, SampledToken
from workers.sampler import Sampler, apply_penalties, apply_top_k_top_p
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
        (dict(logit_bias={"x": 1.0}), "logit_bias keys must be token ids, got 'x'"),
        (dict(logit_bias={"-1": 1.0}), "logit_bias keys must be token ids"),
        (dict(logit_bias={5: 101}), r"logit_bias values must be numbers in \[-100, 100\], got 101 for token 5"),
    ],
)
def test_invalid_values_raise_value_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_normalised_fields() -> None:
    params = SamplingParams(stop="END", top_k=-1)
    assert params.stop == ["END"] and params.top_k == 0 and params.stop_token_ids == []
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def sampler_with(
    params: list[SamplingParams], prompts: list[list[int]] | None = None, seeds: list[int | None] | None = None
) -> Sampler:
    sampler = Sampler(torch.device("cpu"), seed=0)
    for i, p in enumerate(params):
        seed = seeds[i] if seeds else p.seed
        sampler.add(
            NewSequence(seq_id=i, prompt_token_ids=(prompts or [[0]] * len(params))[i], params=p, seed=seed, stop_ids=[3])
        )
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
    assert kept[2] == [True, True, True, True, False]  # 0.85 < 0.86: the 0.1 token is needed too


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
    seen = torch.tensor([[0, 1, 3, 3]])  # prompt [0], output [1, 3, 3]
    counts = torch.tensor([[0.0, 1.0, 2.0, 2.0]])
    one = lambda v: torch.tensor([v])  # noqa: E731
    got = apply_penalties(logits.clone(), seen, counts, one(2.0), one(0.5), one(0.25))[0]
    expected = torch.tensor(
        [
            2.0 / 2.0,  # in the prompt: repetition only
            -1.0 * 2.0 - 0.5 * 1 - 0.25,  # output once, negative logit: multiplied
            0.5,  # unseen
            1.0 / 2.0 - 0.5 * 2 - 0.25,  # output twice
            0.0,
        ]
    )
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


def test_logit_bias_moves_greedy_and_drawn_rows_and_leaves_logprobs_raw() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0, logit_bias={"1": -100, 3: 5.0}, logprobs=1),  # JSON gives keys as strings
        SamplingParams(temperature=0.5, logit_bias={0: 100}),
        SamplingParams(temperature=0),  # batched with them: untouched
    ]
    sampler = sampler_with(params)
    assert params[0].logit_bias == {1: -100.0, 3: 5.0}
    first, drawn, plain = sampler.sample(logits.clone(), [0, 1, 2])
    assert first.token_id == 3 and drawn.token_id == 0 and plain.token_id == 1
    assert math.isclose(first.logprob, float(logits[0].log_softmax(-1)[3]), rel_tol=1e-6)
    sampler.forget([0])
    sampler.add(NewSequence(seq_id=5, prompt_token_ids=[0], params=SamplingParams(temperature=0), seed=None, stop_ids=[]))
    assert sampler.sample(logits[:1].clone(), [5])[0].token_id == 1  # a reused slot has no bias left


def test_a_failed_batch_records_nothing(monkeypatch) -> None:
    """The model runner samples a failed batch again row by row: the failed try must not count
    its tokens towards min_tokens or the penalties."""
    sampler = sampler_with([SamplingParams(temperature=0, min_tokens=1)])
    monkeypatch.setattr(sampler, "_with_logprobs", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        sampler.sample(torch.tensor([[0.0, 0.0, 0.0, 10.0]]), [0])
    monkeypatch.undo()
    assert sampler.sample(torch.tensor([[0.0, 0.0, 0.0, 10.0]]), [0])[0].token_id != 3  # min_tokens still holds


def test_prompt_logprobs() -> None:
    sampler = sampler_with([SamplingParams(prompt_logprobs=1)], prompts=[[5, 2, 0, 1]])
    logits = torch.randn(2, 6)
    entry = sampler.prompt_logprobs(logits, 0, start=1)  # positions 0 and 1 predict prompt tokens 1 and 2
    raw = logits.log_softmax(-1)
    assert entry.start == 1
    assert entry.logprobs == pytest.approx([float(raw[0, 2]), float(raw[1, 0])], rel=1e-6)
    assert [top[0][0] for top in entry.top] == raw.argmax(-1).tolist()


def reference_row(
    row: torch.Tensor, params: SamplingParams, prompt: list[int], outputs: list[int], stop_ids: list[int]
) -> torch.Tensor:
    """One row by the definitions, in float64: min_tokens, penalties, then for a draw temperature, top-k,
    top-p and min-p. Greedy rows: the penalised logits; drawn rows: the probabilities drawn from."""
    row, vocab = row.double().clone(), row.shape[0]
    if len(outputs) < params.min_tokens:
        row[stop_ids] = float("-inf")
    for token in {t for t in prompt if t < vocab} | set(outputs):
        value, count = float(row[token]), outputs.count(token)
        value = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        row[token] = value - params.frequency_penalty * count - params.presence_penalty * (count > 0)
    if params.greedy:
        return row
    row = row / params.temperature
    order = row.argsort(descending=True)
    if params.top_k:
        row[order[params.top_k :]] = float("-inf")
    if params.top_p < 1.0:
        cumulative = row.softmax(-1)[order].cumsum(-1)
        needed = int((cumulative < params.top_p).sum()) + 1
        row[order[needed:]] = float("-inf")
    probs = row.softmax(-1)
    return probs.masked_fill(probs < params.min_p * probs.max(), 0.0)


VOCAB = 32
PARAMS = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.5]),
    top_k=st.sampled_from([0, 0, 1, 3, 40]),
    top_p=st.sampled_from([1.0, 1.0, 0.9, 0.5]),
    min_p=st.sampled_from([0.0, 0.0, 0.2]),
    repetition_penalty=st.sampled_from([1.0, 1.0, 1.3, 0.7]),
    frequency_penalty=st.sampled_from([0.0, 0.0, 0.5, -0.4]),
    presence_penalty=st.sampled_from([0.0, 0.0, 0.6]),
    min_tokens=st.sampled_from([0, 0, 2]),
    logprobs=st.sampled_from([None, None, 0, 3]),
)


@st.composite
def new_sequences(draw, seq_id: int) -> NewSequence:
    return NewSequence(
        seq_id=seq_id,
        prompt_token_ids=draw(st.lists(st.integers(0, VOCAB + 2), min_size=1, max_size=6)),
        params=draw(PARAMS),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**32))),
        stop_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=3)),
    )


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_batched_sampler_matches_the_old_one_and_the_definitions(data) -> None:
    """Add, sample and forget in random orders: every output (tokens, logprobs) equals the old
    per-row sampler's; greedy tokens are the reference's argmax, drawn ones lie in its support."""
    new, old = Sampler(torch.device("cpu"), seed=5), OldSampler(torch.device("cpu"), seed=5)
    live: dict[int, NewSequence] = {}
    outputs: dict[int, list[int]] = {}
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="logits seed"))
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        if live:
            gone = data.draw(st.lists(st.sampled_from(sorted(live)), unique=True, max_size=2), label="forget")
            new.forget(gone), old.forget(gone)
            for seq_id in gone:
                live.pop(seq_id)
        for _ in range(data.draw(st.integers(0 if live else 1, 3), label="adds")):
            seq = data.draw(new_sequences(len(outputs)))
            new.add(seq), old.add(seq)
            live[seq.seq_id], outputs[seq.seq_id] = seq, []
        batch = data.draw(st.permutations(sorted(live)), label="order")[: data.draw(st.integers(1, len(live)), label="rows")]
        logits = torch.randn(len(batch), VOCAB, generator=gen) * 3
        got = new.sample(logits.clone(), batch)
        assert got == old.sample(logits.clone(), batch)
        for row, (seq_id, token) in enumerate(zip(batch, got)):
            seq = live[seq_id]
            ref = reference_row(logits[row], seq.params, seq.prompt_token_ids, outputs[seq_id], seq.stop_ids)
            if seq.params.greedy:
                assert token.token_id == int(ref.argmax())
            else:
                assert ref[token.token_id] > 0
            outputs[seq_id].append(token.token_id)
    seq_id = data.draw(st.sampled_from(sorted(live)), label="prompt logprobs of")
    prompt = [t for t in live[seq_id].prompt_token_ids if t < VOCAB]
    if len(prompt) == len(live[seq_id].prompt_token_ids) and len(prompt) > 1:
        logits = torch.randn(len(prompt) - 1, VOCAB, generator=gen)
        assert new.prompt_logprobs(logits, seq_id, 1) == old.prompt_logprobs(logits, seq_id, 1)


def run_both(seqs: list[NewSequence], steps: int, vocab: int, seed: int = 0) -> tuple[list, list]:
    new, old = Sampler(torch.device("cpu"), seed=seed), OldSampler(torch.device("cpu"), seed=seed)
    for seq in seqs:
        new.add(seq), old.add(seq)
    ids = [s.seq_id for s in seqs]
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = [], []
    for _ in range(steps):
        logits = torch.randn(len(ids), vocab, generator=gen) * 2
        ours.append(new.sample(logits.clone(), ids))
        theirs.append(old.sample(logits.clone(), ids))
    return ours, theirs


def test_long_prompts_many_sequences_and_a_large_vocabulary_match_the_old_sampler() -> None:
    """Penalty storage widened past its first width, slot tables grown past 64 rows."""
    torch.manual_seed(0)
    kinds = [
        SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.3),
        SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1),
        SamplingParams(temperature=1.0, top_k=20, presence_penalty=0.5, logprobs=2),
        SamplingParams(temperature=0.7, min_p=0.05, seed=11),
    ]
    seqs = [
        NewSequence(
            seq_id=i,
            prompt_token_ids=torch.randint(0, 1000, (1 + 37 * (i % 5),)).tolist(),
            params=kinds[i % 4],
            seed=i if i % 3 == 0 else None,
            stop_ids=[7],
        )
        for i in range(70)
    ]
    ours, theirs = run_both(seqs, steps=30, vocab=1000)
    assert ours == theirs


def test_forgotten_slots_are_reused_without_their_history() -> None:
    """A sequence in a reused slot (and penalty slot) sees only its own prompt and output."""
    params = SamplingParams(temperature=0, repetition_penalty=3.0, presence_penalty=1.0, min_tokens=1)
    logits = torch.tensor([[4.0, 3.9, 3.8, 3.7, 0.0]])
    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.add(NewSequence(seq_id=0, prompt_token_ids=[0], params=params, seed=None, stop_ids=[4]))
    first = [sampler.sample(logits, [0])[0].token_id for _ in range(3)]
    assert first == [1, 2, 3]
    slot = sampler.slot_of[0]
    sampler.forget([0])
    sampler.add(NewSequence(seq_id=1, prompt_token_ids=[2], params=params, seed=None, stop_ids=[4]))
    assert sampler.slot_of[1] == slot
    assert [sampler.sample(logits, [1])[0].token_id for _ in range(3)] == [0, 1, 3]
    sampler.forget([1])
    sampler.add(NewSequence(seq_id=2, prompt_token_ids=[1], params=SamplingParams(temperature=0), seed=None, stop_ids=[]))
    assert sampler.sample(logits, [2])[0].token_id == 0  # no penalties left over in the slot


def test_greedy_and_top_k_batches_never_sort(monkeypatch) -> None:
    def no_sort(*args, **kwargs):
        raise AssertionError("sorted")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    logits = torch.randn(4, 100)
    greedy = sampler_with([SamplingParams(temperature=0, logprobs=1)] * 4)
    assert [t.token_id for t in greedy.sample(logits, [0, 1, 2, 3])] == logits.argmax(-1).tolist()
    top_k = sampler_with([SamplingParams(top_k=1), SamplingParams(top_k=5), SamplingParams(), SamplingParams(temperature=0)])
    tokens = [t.token_id for t in top_k.sample(logits, [0, 1, 2, 3])]
    assert tokens[0] == int(logits[0].argmax()) and tokens[1] in logits[1].topk(5).indices.tolist()


# The sampler before the persistent batch, kept verbatim as the reference for seeded (and shared
# generator) draws: the same seeds must give the same tokens as before.


@dataclass
class OldState:
    params: SamplingParams
    prompt_ids: torch.Tensor
    stop_ids: list[int]
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)


class OldSampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.states: dict[int, OldState] = {}
        self.shared = torch.Generator(device=device).manual_seed(seed)

    def add(self, seq: NewSequence) -> None:
        generator = None
        if seq.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=self.device)
        self.states[seq.seq_id] = OldState(seq.params, prompt, list(seq.stop_ids), generator)

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, seq_ids: list[int]) -> list[SampledToken]:
        """One token for each row of `logits` [S, V] (float32), for sequence seq_ids[row]."""
        if not seq_ids:
            return []
        states = [self.states[s] for s in seq_ids]
        processed = self._penalized(logits, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
        greedy = [i for i, st in enumerate(states) if st.params.greedy]
        if greedy:
            tokens[greedy] = processed[greedy].argmax(dim=-1)
        drawn = [i for i, st in enumerate(states) if not st.params.greedy]
        if drawn:
            tokens[drawn] = self._draw(processed[drawn], [states[i] for i in drawn])
        token_list = tokens.tolist()
        for state, token in zip(states, token_list):
            state.output_ids.append(token)
        return self._with_logprobs(logits, seq_ids, states, token_list)

    def _penalized(self, logits: torch.Tensor, states: list[OldState]) -> torch.Tensor:
        rows_min = [i for i, st in enumerate(states) if len(st.output_ids) < st.params.min_tokens and st.stop_ids]
        rows_pen = [i for i, st in enumerate(states) if st.params.uses_penalties]
        if not rows_min and not rows_pen:
            return logits
        logits = logits.clone()
        for i in rows_min:
            logits[i, states[i].stop_ids] = float("-inf")
        if rows_pen:
            logits[rows_pen] = old_apply_penalties(logits[rows_pen], [states[i] for i in rows_pen])
        return logits

    def _draw(self, logits: torch.Tensor, states: list[OldState]) -> torch.Tensor:
        temperature = torch.tensor([s.params.temperature for s in states], device=logits.device)
        logits = logits / temperature[:, None]
        logits = old_apply_top_k_top_p(logits, [s.params.top_k for s in states], [s.params.top_p for s in states])
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([s.params.min_p for s in states], device=logits.device)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(states) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(generator=self.shared)
        for i, state in enumerate(states):
            if state.generator is not None:
                noise[i].exponential_(generator=state.generator)
        return (probs / noise).argmax(dim=-1)

    def _with_logprobs(
        self, logits: torch.Tensor, seq_ids: list[int], states: list[OldState], tokens: list[int]
    ) -> list[SampledToken]:
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        results = [SampledToken(seq_id=s, token_id=t) for s, t in zip(seq_ids, tokens)]
        if not wanted:
            return results
        logprobs = logits[wanted].log_softmax(dim=-1)
        chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)
        for row, i in enumerate(wanted):
            lp, rank, top = old_describe(logprobs[row], chosen[row], states[i].params.logprobs)
            results[i] = SampledToken(seq_id=seq_ids[i], token_id=tokens[i], logprob=lp, rank=rank, top=top)
        return results

    def prompt_logprobs(self, logits: torch.Tensor, seq_id: int, start: int) -> PromptLogprobs:
        """Logprobs of prompt tokens start .. start + len(logits) - 1, from the logits of the positions before each."""
        state = self.states[seq_id]
        targets = state.prompt_ids[start : start + logits.shape[0]]
        logprobs = logits.log_softmax(dim=-1)
        entries = [old_describe(logprobs[i], targets[i], state.params.prompt_logprobs) for i in range(logits.shape[0])]
        return PromptLogprobs(
            seq_id=seq_id,
            start=start,
            logprobs=[e[0] for e in entries],
            ranks=[e[1] for e in entries],
            top=[e[2] for e in entries],
        )


def old_describe(logprobs: torch.Tensor, token: torch.Tensor, k: int) -> tuple[float, int, list[tuple[int, float]]]:
    """(logprob of `token`, its 1-based rank, the top `k` (token, logprob) pairs)."""
    value = logprobs[token]
    rank = int((logprobs > value).sum()) + 1
    top = []
    if k:
        best = logprobs.topk(k)
        top = list(zip(best.indices.tolist(), best.values.tolist()))
    return float(value), rank, top


def old_apply_penalties(logits: torch.Tensor, states: list[OldState]) -> torch.Tensor:
    """Repetition (prompt and output), frequency and presence (output) penalties, vLLM's definitions."""
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab + 1, device=logits.device)
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
    for i, state in enumerate(states):
        if state.output_ids:
            out = torch.tensor(state.output_ids, device=logits.device).clamp(max=vocab)
            counts[i].index_add_(0, out, torch.ones(len(state.output_ids), device=logits.device))
        seen[i, state.prompt_ids.clamp(max=vocab)] = True
    counts, seen = counts[:, :vocab], (seen[:, :vocab] | (counts[:, :vocab] > 0))
    repetition = torch.tensor([s.params.repetition_penalty for s in states], device=logits.device)[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    frequency = torch.tensor([s.params.frequency_penalty for s in states], device=logits.device)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in states], device=logits.device)[:, None]
    return logits - frequency * counts - presence * (counts > 0).float()


def old_apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) all but each row's top_k logits (0: all), then all outside its top_p nucleus."""
    vocab = logits.shape[-1]
    if all(k == 0 or k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    ordered, order = logits.sort(dim=-1, descending=False)
    k = torch.tensor([v if 0 < v < vocab else vocab for v in top_k], device=logits.device)
    kth = ordered.gather(1, (vocab - k)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    p = torch.tensor(top_p, device=logits.device)[:, None]
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1 - p
    outside[:, -1] = False  # the most likely token always stays
    ordered = ordered.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, ordered)
