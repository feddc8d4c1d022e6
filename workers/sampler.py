"""Rank 0's sampler: next tokens from logits, each sequence by its own `SamplingParams`.

A persistent batch, as vLLM V1 keeps one: `add` gives a sequence a slot, a row of preallocated
per-slot parameters (temperature, top-p, min-p, the three penalties, top-k, min_tokens and flags
saying which steps it needs), and `forget` frees it. A step gathers its rows' slots with one index,
and each stage runs once over the rows that need it, or not at all.

Sequences with penalties also hold a penalty slot: the ids they have seen (the prompt, written once
at their first step, then each sampled token appended) and per-vocabulary-id counts of their
output, both updated with the sampled tokens rather than rebuilt.

Order, as vLLM: min_tokens masking, then penalties (repetition over prompt and output; frequency
and presence over the output), then logit_bias, then greedy argmax or temperature, top-k, top-p and min-p and a
draw. A draw is argmax(p / e) with e ~ Exp(1) from the sequence's own generator when it has a
seed, so a seeded sequence gets the same tokens whatever else is in the batch. Logprobs are of
the model's own distribution (the raw logits), as vLLM returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workers.batch import NewSequence, PromptLogprobs, SampledToken
from workers.sampling_params import SamplingParams

DRAWN, SEEDED, TOP_K, TOP_P, MIN_P, PENALTY, FREQ_PRES, MIN_TOKENS, LOGPROBS, LOGIT_BIAS = (1 << i for i in range(10))
"""Bits of a slot's flags: which stages its rows go through."""

TEMPERATURE, TOP_P_COL, MIN_P_COL, REPETITION, FREQUENCY, PRESENCE = range(6)
"""Columns of the per-slot float parameters."""


def flags_of(params: SamplingParams, seeded: bool, has_stop_ids: bool) -> int:
    flags = 0
    if not params.greedy:
        flags |= DRAWN | (SEEDED if seeded else 0) | (TOP_K if params.top_k > 0 else 0)
        flags |= (TOP_P if params.top_p < 1.0 else 0) | (MIN_P if params.min_p > 0.0 else 0)
    if params.uses_penalties:
        flags |= PENALTY | (FREQ_PRES if params.frequency_penalty or params.presence_penalty else 0)
    if params.min_tokens > 0 and has_stop_ids:
        flags |= MIN_TOKENS
    if params.logprobs is not None:
        flags |= LOGPROBS
    if params.uses_logit_bias:
        flags |= LOGIT_BIAS
    return flags


def any_flags(flags: np.ndarray) -> int:
    return int(np.bitwise_or.reduce(flags)) if len(flags) else 0


class PenaltyState:
    """Per penalty slot: the ids seen so far, `ids[p, :lengths[p]]` (the row padded with its first
    id, so a gather of a common width only repeats ids), and `counts[p, v]`, how often id v is in
    the output. Storage is made at the first step, when the vocabulary size is known."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.free: list[int] = []
        self.used = 0
        self.pending: dict[int, list[int]] = {}
        self.lengths = np.zeros(0, dtype=np.int64)
        self.ids = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.counts = torch.zeros(0, 0, device=device)

    def take(self, prompt_ids: list[int]) -> int:
        slot = self.free.pop() if self.free else self.used
        self.used = max(self.used, slot + 1)
        self.pending[slot] = prompt_ids
        return slot

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.pending.pop(slot, None)
        built = [s for s in slots if s < len(self.lengths)]
        if built:
            self.counts[torch.tensor(built, device=self.device)] = 0.0
            self.lengths[built] = 0
        self.free.extend(slots)

    def ensure(self, vocab: int) -> None:
        """Storage for every slot taken so far, and the pending prompts written into it."""
        if self.counts.shape[1] not in (0, vocab):
            raise ValueError(f"logits have {vocab} columns, earlier steps had {self.counts.shape[1]}")
        if self.used > len(self.lengths):
            self._grow(max(self.used, 2 * len(self.lengths), 16), self.ids.shape[1], vocab)
        if not self.pending:
            return
        prompts = {slot: [t for t in ids if 0 <= t < vocab] for slot, ids in self.pending.items()}
        self.pending.clear()
        self._widen(max(len(ids) for ids in prompts.values()) + 1)
        for slot, ids in prompts.items():
            if ids:
                row = np.full(self.ids.shape[1], ids[0], dtype=np.int64)
                row[: len(ids)] = ids
                self.ids[slot] = torch.from_numpy(row).to(self.device)
            self.lengths[slot] = len(ids)

    def append(self, slots: np.ndarray, tokens: torch.Tensor) -> None:
        lengths = self.lengths[slots]
        self._widen(int(lengths.max()) + 1)
        index = torch.from_numpy(slots).to(self.device)
        empty = lengths == 0
        if empty.any():
            fresh = torch.from_numpy(np.flatnonzero(empty)).to(self.device)
            self.ids[index[fresh]] = tokens[fresh, None].expand(-1, self.ids.shape[1])
        self.ids[index, torch.from_numpy(lengths).to(self.device)] = tokens
        self.counts.index_put_((index, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
        self.lengths[slots] += 1

    def _grow(self, slots: int, width: int, vocab: int) -> None:
        old = len(self.lengths)
        ids = torch.zeros(slots, width, dtype=torch.long, device=self.device)
        counts = torch.zeros(slots, vocab, device=self.device)
        if old:
            ids[:old], counts[:old] = self.ids, self.counts
        self.ids, self.counts = ids, counts
        self.lengths = np.concatenate([self.lengths, np.zeros(slots - old, dtype=np.int64)])

    def _widen(self, width: int) -> None:
        if width <= self.ids.shape[1]:
            return
        old = self.ids
        self.ids = torch.empty(old.shape[0], max(width, 2 * old.shape[1], 64), dtype=torch.long, device=self.device)
        self.ids[:, : old.shape[1]] = old
        self.ids[:, old.shape[1] :] = old[:, :1] if old.shape[1] else 0


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.params: list[SamplingParams | None] = []
        self.prompts: list[list[int] | None] = []
        self.generators: list[torch.Generator | None] = []
        self.flags = np.zeros(0, dtype=np.int64)
        self.values = np.zeros((0, 6), dtype=np.float32)
        self.top_k = np.zeros(0, dtype=np.int64)
        self.min_tokens = np.zeros(0, dtype=np.int64)
        self.num_output = np.zeros(0, dtype=np.int64)
        self.penalty_slot = np.zeros(0, dtype=np.int64)
        self.stop_ids = np.zeros((0, 1), dtype=np.int64)
        self.penalties = PenaltyState(device)
        self.biases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Per slot with logit_bias: (token ids, biases) on the device."""

    def add(self, seq: NewSequence) -> None:
        if seq.seq_id in self.slot_of:
            self.forget([seq.seq_id])
        slot = self._take_slot()
        p = seq.params
        self.slot_of[seq.seq_id] = slot
        self.params[slot], self.prompts[slot] = p, seq.prompt_token_ids
        self.generators[slot] = None if seq.seed is None else torch.Generator(device=self.device).manual_seed(seq.seed)
        self.flags[slot] = flags_of(p, seq.seed is not None, bool(seq.stop_ids))
        self.values[slot] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        self.top_k[slot], self.min_tokens[slot], self.num_output[slot] = p.top_k, p.min_tokens, 0
        if seq.stop_ids:
            self._set_stop_ids(slot, list(seq.stop_ids))
        self.penalty_slot[slot] = self.penalties.take(list(seq.prompt_token_ids)) if p.uses_penalties else -1
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias.items())
            self.biases[slot] = (
                torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(biases, dtype=torch.float32, device=self.device),
            )

    def forget(self, seq_ids: list[int]) -> None:
        released = []
        for seq_id in seq_ids:
            slot = self.slot_of.pop(seq_id, None)
            if slot is None:
                continue
            if self.penalty_slot[slot] >= 0:
                released.append(int(self.penalty_slot[slot]))
            self.params[slot] = self.prompts[slot] = self.generators[slot] = None
            self.biases.pop(slot, None)
            self.flags[slot], self.penalty_slot[slot] = 0, -1
            self.free.append(slot)
        if released:
            self.penalties.release(released)

    def sample(self, logits: torch.Tensor, seq_ids: list[int]) -> list[SampledToken]:
        """One token for each row of `logits` [S, V] (float32), for sequence seq_ids[row]."""
        if not seq_ids:
            return []
        slots = np.fromiter((self.slot_of[s] for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        flags = self.flags[slots]
        present = any_flags(flags)
        if present & (DRAWN | PENALTY | MIN_TOKENS | LOGIT_BIAS):
            tokens = self._sample(logits, slots, flags, present)
        else:
            tokens = logits.argmax(dim=-1)
        token_list = tokens.tolist()
        results = self._with_logprobs(logits, seq_ids, slots, flags, present, tokens, token_list)
        self._record(slots, flags, present, tokens)  # last: a batch that fails above is retried row by row
        return results

    def _sample(self, logits: torch.Tensor, slots: np.ndarray, flags: np.ndarray, present: int) -> torch.Tensor:
        processed = self._penalized(logits, slots, flags, present)
        if not present & DRAWN:
            return processed.argmax(dim=-1)
        drawn = (flags & DRAWN) != 0
        if drawn.all():
            return self._draw(processed, slots, flags)
        tokens = torch.empty(len(slots), dtype=torch.long, device=logits.device)
        greedy_rows, drawn_rows = self._index(np.flatnonzero(~drawn)), self._index(np.flatnonzero(drawn))
        tokens[greedy_rows] = processed[greedy_rows].argmax(dim=-1)
        tokens[drawn_rows] = self._draw(processed[drawn_rows], slots[drawn], flags[drawn])
        return tokens

    def _penalized(self, logits: torch.Tensor, slots: np.ndarray, flags: np.ndarray, present: int) -> torch.Tensor:
        """The logits after min_tokens masking, penalties and logit_bias (a copy, where any applies)."""
        if not present & (PENALTY | MIN_TOKENS | LOGIT_BIAS):
            return logits
        logits = logits.clone()
        if present & MIN_TOKENS:
            rows = np.flatnonzero(flags & MIN_TOKENS)
            logits[self._index(rows)[:, None], self._index(self.stop_ids[slots[rows]])] = float("-inf")
        if present & PENALTY:
            self.penalties.ensure(logits.shape[1])
            rows = np.flatnonzero(flags & PENALTY)
            pslots = self.penalty_slot[slots[rows]]
            lengths = self.penalties.lengths[pslots]
            rows, pslots, lengths = rows[lengths > 0], pslots[lengths > 0], lengths[lengths > 0]
            if len(rows):
                self._penalize(logits, rows, slots[rows], pslots, int(lengths.max()), bool(present & FREQ_PRES))
        if present & LOGIT_BIAS:
            for row in np.flatnonzero(flags & LOGIT_BIAS).tolist():
                ids, biases = self.biases[int(slots[row])]
                logits[row].index_add_(0, ids, biases)
        return logits

    def _penalize(
        self, logits: torch.Tensor, rows: np.ndarray, slots: np.ndarray, pslots: np.ndarray, width: int, counted: bool
    ) -> None:
        index = self._index(pslots)
        seen = self.penalties.ids[:, :width][index]
        counts = self.penalties.counts[index[:, None], seen] if counted else None
        values = self._index(self.values[slots][:, REPETITION:])
        apply_penalties(logits, seen, counts, values[:, 0], values[:, 1], values[:, 2], rows=self._index(rows))

    def _draw(self, logits: torch.Tensor, slots: np.ndarray, flags: np.ndarray) -> torch.Tensor:
        present = any_flags(flags)
        values = self.values[slots]
        logits = logits / self._index(values[:, TEMPERATURE : TEMPERATURE + 1])
        if present & (TOP_K | TOP_P):
            logits = apply_top_k_top_p(logits, self.top_k[slots], values[:, TOP_P_COL])
        probs = logits.softmax(dim=-1)
        if present & MIN_P:
            min_p = self._index(values[:, MIN_P_COL : MIN_P_COL + 1])
            probs.masked_fill_(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs.div_(self._noise(probs, slots, flags)).argmax(dim=-1)

    def _noise(self, probs: torch.Tensor, slots: np.ndarray, flags: np.ndarray) -> torch.Tensor:
        """Exp(1) draws: unseeded rows together from the shared generator, then each seeded row from its own."""
        noise = torch.empty_like(probs)
        seeded = (flags & SEEDED) != 0
        if not seeded.any():
            return noise.exponential_(generator=self.shared)
        unseeded = np.flatnonzero(~seeded)
        if len(unseeded):
            noise[self._index(unseeded)] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                generator=self.shared
            )
        for row in np.flatnonzero(seeded).tolist():
            noise[row].exponential_(generator=self.generators[slots[row]])
        return noise

    def _record(self, slots: np.ndarray, flags: np.ndarray, present: int, tokens: torch.Tensor) -> None:
        self.num_output[slots] += 1
        if present & MIN_TOKENS:
            done = slots[((flags & MIN_TOKENS) != 0) & (self.num_output[slots] >= self.min_tokens[slots])]
            self.flags[done] &= ~MIN_TOKENS
        if present & PENALTY:
            rows = np.flatnonzero(flags & PENALTY)
            self.penalties.append(self.penalty_slot[slots[rows]], tokens[self._index(rows)])

    def _with_logprobs(
        self,
        logits: torch.Tensor,
        seq_ids: list[int],
        slots: np.ndarray,
        flags: np.ndarray,
        present: int,
        tokens: torch.Tensor,
        token_list: list[int],
    ) -> list[SampledToken]:
        results = [SampledToken(seq_id=s, token_id=t) for s, t in zip(seq_ids, token_list)]
        if not present & LOGPROBS:
            return results
        wanted = np.flatnonzero(flags & LOGPROBS)
        index = self._index(wanted)
        ks = [self.params[slots[i]].logprobs for i in wanted]
        for i, (lp, rank, top) in zip(wanted.tolist(), describe_rows(logits[index].log_softmax(dim=-1), tokens[index], ks)):
            results[i] = SampledToken(seq_id=seq_ids[i], token_id=token_list[i], logprob=lp, rank=rank, top=top)
        return results

    def prompt_logprobs(self, logits: torch.Tensor, seq_id: int, start: int) -> PromptLogprobs:
        """Logprobs of prompt tokens start .. start + len(logits) - 1, from the logits of the positions before each."""
        slot = self.slot_of[seq_id]
        targets = torch.tensor(self.prompts[slot][start : start + logits.shape[0]], dtype=torch.long, device=logits.device)
        k = self.params[slot].prompt_logprobs or 0
        entries = describe_rows(logits.log_softmax(dim=-1), targets, [k] * logits.shape[0])
        return PromptLogprobs(
            seq_id=seq_id,
            start=start,
            logprobs=[e[0] for e in entries],
            ranks=[e[1] for e in entries],
            top=[e[2] for e in entries],
        )

    def _index(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _take_slot(self) -> int:
        if not self.free:
            self._grow(max(2 * len(self.flags), 64))
        return self.free.pop()

    def _grow(self, capacity: int) -> None:
        old = len(self.flags)
        extra = capacity - old

        def pad(array: np.ndarray, fill: float = 0) -> np.ndarray:
            return np.concatenate([array, np.full((extra, *array.shape[1:]), fill, dtype=array.dtype)])

        self.flags, self.values, self.top_k = pad(self.flags), pad(self.values), pad(self.top_k)
        self.min_tokens, self.num_output, self.penalty_slot = (
            pad(self.min_tokens),
            pad(self.num_output),
            pad(self.penalty_slot, -1),
        )
        self.stop_ids = pad(self.stop_ids)
        self.params += [None] * extra
        self.prompts += [None] * extra
        self.generators += [None] * extra
        self.free.extend(range(capacity - 1, old - 1, -1))

    def _set_stop_ids(self, slot: int, stop_ids: list[int]) -> None:
        """Row `slot` of the stop-id table, padded with its first id (masking it twice is harmless)."""
        if len(stop_ids) > self.stop_ids.shape[1]:
            wider = np.repeat(self.stop_ids[:, :1], len(stop_ids), axis=1)
            wider[:, : self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[slot] = stop_ids[0]
        self.stop_ids[slot, : len(stop_ids)] = stop_ids


def describe_rows(
    logprobs: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int | None]
) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """Per row: (logprob of its token, the token's 1-based rank, the top ks[row] (token, logprob) pairs)."""
    values = logprobs.gather(1, tokens[:, None])
    ranks = ((logprobs > values).sum(dim=-1) + 1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in ks]
    for k in sorted({k for k in ks if k}):
        rows = [i for i, ki in enumerate(ks) if ki == k]
        chosen = logprobs if len(rows) == len(ks) else logprobs[torch.tensor(rows, device=logprobs.device)]
        best = chosen.topk(k)
        for i, indices, lps in zip(rows, best.indices.tolist(), best.values.tolist()):
            tops[i] = list(zip(indices, lps))
    return list(zip(values[:, 0].tolist(), ranks, tops))


def apply_penalties(
    logits: torch.Tensor,
    seen_ids: torch.Tensor,
    output_counts: torch.Tensor | None,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM's penalties, in place on logits rows `rows` (all when None); row i of the others is about rows[i].

    Over the ids a row has seen (seen_ids [R, L], prompt and output; repeats are fine, each copy
    gets the same value): a logit l becomes l / r when positive, l * r otherwise (repetition), then
    loses f * c + p * (c > 0) for an id seen c = output_counts[i, j] times in the output (frequency
    and presence; output_counts None: all f and p are zero). Ids a row has not seen keep their logit.
    """
    vocab = logits.shape[1]
    if rows is None:
        rows = torch.arange(seen_ids.shape[0], device=logits.device)
    flat = logits.view(-1)
    where = rows[:, None] * vocab + seen_ids
    values = flat[where]
    r = repetition[:, None]
    values = torch.where(values > 0, values / r, values * r)
    if output_counts is not None:
        values = values - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0).float()
    flat[where] = values
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int] | np.ndarray, top_p: Sequence[float] | np.ndarray
) -> torch.Tensor:
    """Mask (to -inf) all but each row's top_k logits (0: all), then all outside its top_p nucleus.

    The nucleus needs a sort; without any top_p < 1 a top-k alone is a `topk`, which keeps the same set.
    """
    vocab = logits.shape[-1]
    k = np.asarray(top_k, dtype=np.int64)
    p = np.asarray(top_p, dtype=np.float32)
    limited = (k > 0) & (k < vocab)
    k = np.where(limited, k, vocab)
    if (p >= 1.0).all():
        return _top_k_only(logits, k, limited) if limited.any() else logits
    ordered, order = logits.sort(dim=-1, descending=False)
    if limited.any():
        kth = ordered.gather(1, torch.from_numpy(vocab - k).to(logits.device)[:, None])
        ordered.masked_fill_(ordered < kth, float("-inf"))
    p_t = torch.from_numpy(p).to(logits.device)[:, None]
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1 - p_t
    outside[:, -1] = False  # the most likely token always stays
    ordered.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)  # order is a permutation: every place is written


def _top_k_only(logits: torch.Tensor, k: np.ndarray, limited: np.ndarray) -> torch.Tensor:
    largest = int(k[limited].max())
    place = torch.from_numpy(np.minimum(k, largest) - 1).to(logits.device)
    kth = logits.topk(largest, dim=-1).values.gather(1, place[:, None])
    kth = kth.masked_fill(~torch.from_numpy(limited).to(logits.device)[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))
