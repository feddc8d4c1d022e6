"""One engine step on one rank: a `Batch` in, the model run over the paged KV cache, and on rank 0
the sampled tokens (and prompt logprobs) out."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels.paged_decode_attention import DecodeBlockPlan, additive_mask, decode_block_plan
from parallel.state import TensorParallelGroup
from workers.batch import Batch, FailedSample, SampledToken, StepResult
from workers.block_tables import BlockTables
from workers.config import EngineConfig
from workers.cuda_graphs import DecodeGraphs, cuda_graphs_wanted, decode_buckets
from workers.faults import InjectedFault, faults_enabled, wants_fault
from workers.kv_cache import KVCache
from workers.models.layers import PagedMetadata
from workers.sampler import Sampler
from workers.step_threads import StepThreads

FEW_DECODES = 8
"""Up to this many sequences, a CPU step of decodes alone builds its inputs from Python lists
(`ModelRunner.prepare_few_decodes`): numpy's cost per call, paid some forty times by the
general build, was a fifth of a tiny model's batch-1 step."""

NO_ROWS = torch.zeros(0, dtype=torch.int64)
"""A few-decodes step's tail rows when it has none to zero (shared, read-only)."""


class ModelRunner:
    def __init__(
        self, model: nn.Module, kv_cache: KVCache, config: EngineConfig, tp: TensorParallelGroup, device: torch.device
    ) -> None:
        self.model, self.config, self.tp, self.device = model, config, tp, device
        self.block_size = config.cache.block_size
        self.dtype = getattr(torch, config.model.dtype)
        model.bind_kv_cache(kv_cache.keys, kv_cache.values, kv_cache.pairs)
        self.pair_blocks = kv_cache.pairs[0].shape[1] if kv_cache.pairs else 0
        """Blocks of each layer's [2, ...] pool pair, for the decode plan's one gather of both (0: no pairs)."""
        self.sampler = Sampler(device, config.model.seed) if tp.rank == 0 else None
        self.faulty: set[int] = set()
        """Sequences that asked to fail while sampling (`workers.faults`; empty unless tests turn faults on)."""
        self.faults = faults_enabled()
        self.tables = BlockTables(-(-config.model.max_model_len // self.block_size))
        self.staging = StagingBuffer(device)
        self.threads = StepThreads(model, device)
        self.graphs: DecodeGraphs | None = None
        """CUDA graphs of decode steps, once `capture_graphs` has captured them."""

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult | None:
        threads = self.threads.narrow(len(batch.token_ids))  # no context manager: its generator costs a few us a step
        try:
            return self._execute(batch)
        finally:
            self.threads.restore(threads)

    def _execute(self, batch: Batch) -> StepResult | None:
        self.tables.apply(batch.table_updates, batch.finished_seq_ids)
        if self.sampler is not None:
            self.sampler.forget(batch.finished_seq_ids)
            for seq in batch.new_seqs:
                self.sampler.add(seq)
            if self.faults:
                self._note_faults(batch)
        if not batch.seq_ids:
            return StepResult() if self.sampler is not None else None
        ids, positions, meta = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(meta, len(batch.token_ids)):
            hidden = self.graphs.run(ids, positions, meta)
        else:
            hidden = self.model.forward(ids, positions, meta)  # no hooks: __call__'s checks cost a few us
        rows, sample_rows, prompt_rows = self.logit_rows(batch)
        if rows and rows != list(range(len(ids))):
            hidden = hidden[rows]
        logits = self.model.compute_logits(hidden) if rows else None
        if self.sampler is None:
            return None
        return self.results(batch, logits, sample_rows, prompt_rows)

    def capture_graphs(self) -> int:
        """Capture the decode step's CUDA graphs at every bucket, where they are wanted
        (`workers.cuda_graphs`); the device bytes they took (0: none captured)."""
        if not cuda_graphs_wanted(self.config)[0]:
            return 0
        graphs = DecodeGraphs(self.model, decode_buckets(self.config.scheduler.max_num_seqs), self.tables.width, self.device)
        nbytes = graphs.capture()
        self.graphs = graphs
        return nbytes

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """Token ids, positions and the attention metadata of a step (`prepare_any`; a CPU step of
        a few decodes alone through `prepare_few_decodes`, which gives the same tensors that the
        CPU path reads)."""
        if self.device.type == "cpu" and batch.num_decodes == len(batch.seq_ids) <= FEW_DECODES:
            return self.prepare_few_decodes(batch)
        return self.prepare_any(batch)

    def prepare_any(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """Token ids, positions and the attention metadata, built with numpy in one host buffer and
        copied to the device at once (`StagingBuffer`; on CPU the tensors are views of it).

        The buffer holds, as int64: ids, positions, slot mapping [T]; then as int32: context
        lengths [S], the prompt chunks' query starts [S - n + 1], the block tables [S, W]. Token t of
        sequence i (its tokens end at e_i) sits at position t + L_i - e_i, in slot
        table[i, p // block_size] * block_size + p % block_size.
        """
        bs, n = self.block_size, batch.num_decodes
        tokens, seqs = len(batch.token_ids), len(batch.seq_ids)
        gathered = self.tables.gather(batch.seq_ids).numpy()
        width, chunks = gathered.shape[1], seqs - n
        longs, ints = 3 * tokens, seqs + chunks + 1 + seqs * width
        host = self.staging.take(8 * longs + 4 * ints)
        ids, positions, slots = host[: 8 * longs].view(np.int64).reshape(3, tokens)
        int32s = host[8 * longs :].view(np.int32)
        context, query_start, tables = (
            int32s[:seqs],
            int32s[seqs : seqs + chunks + 1],
            int32s[seqs + chunks + 1 :].reshape(seqs, width),
        )
        ids[:], context[:], tables[:] = batch.token_ids, batch.context_lens, gathered
        if chunks:
            query = np.asarray(batch.query_lens)
            ends = np.cumsum(query)
            positions[:] = np.arange(tokens) + np.repeat(context - ends, query)
            query_start[0], query_start[1:] = 0, ends[n:] - n
            seq_of_token = np.repeat(np.arange(seqs), query)
        else:
            positions[:] = context - 1
            seq_of_token = np.arange(seqs)
        np.add(tables[seq_of_token, positions // bs].astype(np.int64) * bs, positions % bs, out=slots)
        device = self.staging.to_device(host)
        longs_t, ints_t = device[: 8 * longs].view(torch.int64), device[8 * longs :].view(torch.int32)
        ids_t, positions_t, slots_t = longs_t.view(3, tokens)
        context_t, query_start_t = ints_t[:seqs], ints_t[seqs : seqs + chunks + 1]
        tables_t = ints_t[seqs + chunks + 1 :].view(seqs, width)
        meta = PagedMetadata(
            slot_mapping=slots_t,
            num_decodes=n,
            decode_block_tables=tables_t[:n],
            decode_context_lens=context_t[:n],
            prefill_block_tables=tables_t[n:],
            prefill_query_start=query_start_t,
            prefill_context_lens=context_t[n:],
            max_prefill_query_len=max(batch.query_lens[n:], default=0),
            decode_blocks=self.decode_blocks(tables[:n], context[:n]) if n and self.device.type != "cuda" else None,
            prefill_spans=self.prefill_spans(batch) if self.device.type != "cuda" else (),
        )
        return ids_t, positions_t, meta

    def prepare_few_decodes(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """`prepare_any`'s tensors for a CPU step of at most FEW_DECODES decodes, from the
        tables' lists, less the kernels' int32 inputs (its torch path does not read them):
        decode i (context length L_i) writes position L_i - 1, and its gathered context is its
        first ceil(L_i / block_size) blocks padded with the null block to the longest's
        (`DecodeBlockPlan`)."""
        bs, lens, pair = self.block_size, batch.context_lens, self.pair_blocks
        longest = max(lens)
        width = -(-longest // bs)
        tables = [self.tables.blocks_of(s) for s in batch.seq_ids]
        slots, blocks, tail = [], [], []
        for i, (table, length) in enumerate(zip(tables, lens)):
            used, last = -(-length // bs), length - 1
            slots.append(table[last // bs] * bs + last % bs)
            blocks += table[:used] + [0] * (width - used)
            start = i * width * bs
            tail += range(start + length, start + min(used * bs, longest))
        count = len(lens)
        rows = blocks + [b + pair for b in blocks] if pair else blocks  # keys' rows, then values'
        ids_t, positions_t, slots_t, rows_t = torch.tensor([*batch.token_ids, *(n - 1 for n in lens), *slots, *rows]).split(
            (count, count, count, len(rows))
        )
        mask = None
        if min(lens) < longest:
            mask = additive_mask(np.arange(longest) < np.asarray(lens)[:, None, None, None], self.dtype)
        tail_t = torch.tensor(tail, dtype=torch.int64) if tail else NO_ROWS
        plan = DecodeBlockPlan(rows_t[: len(blocks)], tail_t, mask, longest, rows_t if pair else None, pair)
        return ids_t, positions_t, PagedMetadata(slot_mapping=slots_t, num_decodes=count, decode_blocks=plan)

    def decode_blocks(self, tables: np.ndarray, context: np.ndarray) -> DecodeBlockPlan:
        return decode_block_plan(tables, context, self.block_size, self.dtype, self.pair_blocks)

    @staticmethod
    def prefill_spans(batch: Batch) -> tuple[tuple[int, int, int], ...]:
        """(first token, end, context length) of each prompt chunk, its tokens counted from the first after the decodes."""
        spans, end = [], 0
        for qlen, clen in zip(batch.query_lens[batch.num_decodes :], batch.context_lens[batch.num_decodes :]):
            spans.append((end, end + qlen, clen))
            end += qlen
        return tuple(spans)

    @staticmethod
    def logit_rows(batch: Batch) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
        """Token rows whose logits are needed: (all rows, the sample rows' places in them,
        (sequence index, place of its first prompt-logprob row, count) for prompt logprobs)."""
        rows, sample_rows, prompt_rows, end = [], [], [], 0
        for i, (qlen, sample, count) in enumerate(zip(batch.query_lens, batch.sample, batch.prompt_logprob_counts)):
            start, end = end, end + qlen
            if count:
                prompt_rows.append((i, len(rows), count))
                rows.extend(range(start, start + count))
            if sample:
                sample_rows.append(len(rows))
                rows.append(end - 1)
        return rows, sample_rows, prompt_rows

    def results(self, batch: Batch, logits: torch.Tensor | None, sample_rows: list[int], prompt_rows: list) -> StepResult:
        sampled_ids = [s for s, sample in zip(batch.seq_ids, batch.sample) if sample]
        sampled, failed = [], []
        if sampled_ids:
            rows = logits if len(sample_rows) == len(logits) else logits[sample_rows]  # sample_rows ascend
            try:
                if self.faulty and not self.faulty.isdisjoint(sampled_ids):
                    raise InjectedFault("a test asked this step's sampling to fail")
                sampled = self.sampler.sample(rows.float(), sampled_ids)
            except Exception:  # find the rows at fault; the others keep their tokens
                sampled, failed = self._sample_each(rows.float(), sampled_ids)
        prompt = []
        for i, first, count in prompt_rows:
            position = batch.context_lens[i] - batch.query_lens[i]
            try:
                prompt.append(self.sampler.prompt_logprobs(logits[first : first + count].float(), batch.seq_ids[i], position + 1))
            except Exception as exc:
                failed.append(FailedSample(batch.seq_ids[i], f"its prompt logprobs failed: {type(exc).__name__}: {exc}"))
        return StepResult(sampled=sampled, prompt_logprobs=prompt, failed=failed)

    def _sample_each(self, logits: torch.Tensor, seq_ids: list[int]) -> tuple[list[SampledToken], list[FailedSample]]:
        """Sample row by row after a batch failed: the rows that fail alone are the step's failed
        sequences (with a stand-in token, 0, for the placeholders of a step already sent); every
        other row gets the token it gets alone. A seeded row's generator may have moved in the
        failed attempt, so its draw in this one step can differ from an undisturbed run."""
        sampled, failed = [], []
        for row, seq_id in enumerate(seq_ids):
            try:
                if seq_id in self.faulty:
                    raise InjectedFault("a test asked this request's sampling to fail")
                sampled.extend(self.sampler.sample(logits[row : row + 1], [seq_id]))
            except Exception as exc:
                failed.append(FailedSample(seq_id, f"sampling failed: {type(exc).__name__}: {exc}"))
                sampled.append(SampledToken(seq_id=seq_id, token_id=0))
        return sampled, failed

    def _note_faults(self, batch: Batch) -> None:
        self.faulty.difference_update(batch.finished_seq_ids)
        self.faulty.update(seq.seq_id for seq in batch.new_seqs if wants_fault(seq.params, "sample"))


class StagingBuffer:
    """The host memory a step's inputs are built in, and their one copy to the device.

    On CUDA: one pinned buffer, reused (grown when a step needs more), copied with one non_blocking
    H2D copy; before it is written again the previous copy is waited for (an event). On CPU: a
    fresh numpy buffer per step, whose tensors are the step's inputs themselves (no copy).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = torch.empty(0, dtype=torch.uint8)
        self.copied: torch.cuda.Event | None = None

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of `nbytes` (8-byte aligned) to build a step's inputs in."""
        if self.device.type != "cuda":
            return np.empty(nbytes, dtype=np.uint8)
        if self.copied is not None:
            self.copied.synchronize()
        if self.pinned.numel() < nbytes:
            self.pinned = torch.empty(max(nbytes, 2 * self.pinned.numel(), 4096), dtype=torch.uint8, pin_memory=True)
        return self.pinned.numpy()[:nbytes]

    def to_device(self, host: np.ndarray) -> torch.Tensor:
        """The buffer on the device: one copy on CUDA, the same memory on CPU."""
        if self.device.type != "cuda":
            return torch.from_numpy(host)
        on_device = self.pinned[: len(host)].to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return on_device
