"""Rank 0's sampler: next tokens from logits, each sequence by its own `SamplingParams`.

Order, as vLLM: min_tokens masking, then penalties (repetition over prompt and output; frequency
and presence over the output), then greedy argmax or temperature, top-k, top-p and min-p and a
draw. A draw is argmax(p / e) with e ~ Exp(1) from the sequence's own generator when it has a
seed, so a seeded sequence gets the same tokens whatever else is in the batch. Logprobs are of
the model's own distribution (the raw logits), as vLLM returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.batch import NewSequence, PromptLogprobs, SampledToken
from workers.sampling_params import SamplingParams


@dataclass
class SequenceState:
    params: SamplingParams
    prompt_ids: torch.Tensor
    stop_ids: list[int]
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.states: dict[int, SequenceState] = {}
        self.shared = torch.Generator(device=device).manual_seed(seed)

    def add(self, seq: NewSequence) -> None:
        generator = None
        if seq.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=self.device)
        self.states[seq.seq_id] = SequenceState(seq.params, prompt, list(seq.stop_ids), generator)

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

    def _penalized(self, logits: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
        rows_min = [i for i, st in enumerate(states) if len(st.output_ids) < st.params.min_tokens and st.stop_ids]
        rows_pen = [i for i, st in enumerate(states) if st.params.uses_penalties]
        if not rows_min and not rows_pen:
            return logits
        logits = logits.clone()
        for i in rows_min:
            logits[i, states[i].stop_ids] = float("-inf")
        if rows_pen:
            logits[rows_pen] = apply_penalties(logits[rows_pen], [states[i] for i in rows_pen])
        return logits

    def _draw(self, logits: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
        temperature = torch.tensor([s.params.temperature for s in states], device=logits.device)
        logits = logits / temperature[:, None]
        logits = apply_top_k_top_p(
            logits, [s.params.top_k for s in states], [s.params.top_p for s in states]
        )
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

    def _with_logprobs(self, logits: torch.Tensor, seq_ids: list[int], states: list[SequenceState], tokens: list[int]) -> list[SampledToken]:
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        results = [SampledToken(seq_id=s, token_id=t) for s, t in zip(seq_ids, tokens)]
        if not wanted:
            return results
        logprobs = logits[wanted].log_softmax(dim=-1)
        chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)
        for row, i in enumerate(wanted):
            lp, rank, top = describe(logprobs[row], chosen[row], states[i].params.logprobs)
            results[i] = SampledToken(seq_id=seq_ids[i], token_id=tokens[i], logprob=lp, rank=rank, top=top)
        return results

    def prompt_logprobs(self, logits: torch.Tensor, seq_id: int, start: int) -> PromptLogprobs:
        """Logprobs of prompt tokens start .. start + len(logits) - 1, from the logits of the positions before each."""
        state = self.states[seq_id]
        targets = state.prompt_ids[start : start + logits.shape[0]]
        logprobs = logits.log_softmax(dim=-1)
        entries = [describe(logprobs[i], targets[i], state.params.prompt_logprobs) for i in range(logits.shape[0])]
        return PromptLogprobs(
            seq_id=seq_id, start=start, logprobs=[e[0] for e in entries], ranks=[e[1] for e in entries], top=[e[2] for e in entries]
        )


def describe(logprobs: torch.Tensor, token: torch.Tensor, k: int) -> tuple[float, int, list[tuple[int, float]]]:
    """(logprob of `token`, its 1-based rank, the top `k` (token, logprob) pairs)."""
    value = logprobs[token]
    rank = int((logprobs > value).sum()) + 1
    top = []
    if k:
        best = logprobs.topk(k)
        top = list(zip(best.indices.tolist(), best.values.tolist()))
    return float(value), rank, top


def apply_penalties(logits: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
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


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
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
