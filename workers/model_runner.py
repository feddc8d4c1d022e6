"""One engine step on one rank: a `Batch` in, the model run over the paged KV cache, and on rank 0
the sampled tokens (and prompt logprobs) out."""

from __future__ import annotations

import torch
from torch import nn

from kernels.paged_decode_attention import decode_gather_plan
from parallel.state import TensorParallelGroup
from workers.batch import Batch, StepResult
from workers.block_tables import BlockTables
from workers.config import EngineConfig
from workers.kv_cache import KVCache
from workers.models.layers import PagedMetadata
from workers.sampler import Sampler


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache, config: EngineConfig, tp: TensorParallelGroup, device: torch.device) -> None:
        self.model, self.config, self.tp, self.device = model, config, tp, device
        self.block_size = config.cache.block_size
        model.bind_kv_cache(kv_cache.keys, kv_cache.values)
        self.sampler = Sampler(device, config.model.seed) if tp.rank == 0 else None
        self.tables = BlockTables(-(-config.model.max_model_len // self.block_size))

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult | None:
        self.tables.apply(batch.table_updates, batch.finished_seq_ids)
        if self.sampler is not None:
            self.sampler.forget(batch.finished_seq_ids)
            for seq in batch.new_seqs:
                self.sampler.add(seq)
        if not batch.seq_ids:
            return StepResult() if self.sampler is not None else None
        ids = torch.tensor(batch.token_ids, dtype=torch.long, device=self.device)
        positions, meta = self.prepare(batch)
        hidden = self.model(ids, positions, meta)
        rows, sample_rows, prompt_rows = self.logit_rows(batch)
        logits = self.model.compute_logits(hidden[rows]) if rows else None
        if self.sampler is None:
            return None
        return self.results(batch, logits, sample_rows, prompt_rows)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, PagedMetadata]:
        """Token positions and the attention metadata, built on the device from the batch's lists."""
        device, bs = self.device, self.block_size
        query = torch.tensor(batch.query_lens, dtype=torch.long)
        context = torch.tensor(batch.context_lens, dtype=torch.long)
        seq_of_token = torch.repeat_interleave(torch.arange(len(batch.seq_ids)), query)
        starts = torch.cumsum(query, 0) - query
        positions = (context - query)[seq_of_token] + torch.arange(int(query.sum())) - starts[seq_of_token]
        tables = self.tables.gather(batch.seq_ids)
        slots = tables[seq_of_token, positions // bs].long() * bs + positions % bs
        n = batch.num_decodes
        prefill_query = query[n:]
        decode_tables, decode_lens = tables[:n].to(device), context[:n].to(torch.int32).to(device)
        plan = decode_gather_plan(decode_tables, decode_lens, bs) if n and device.type != "cuda" else None
        meta = PagedMetadata(
            slot_mapping=slots.to(device),
            num_decodes=n,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            decode_plan=plan,
            prefill_block_tables=tables[n:].to(device),
            prefill_query_start=torch.cat([torch.zeros(1, dtype=torch.long), prefill_query.cumsum(0)]).to(torch.int32).to(device),
            prefill_context_lens=context[n:].to(torch.int32).to(device),
            max_prefill_query_len=int(prefill_query.max()) if len(prefill_query) else 0,
        )
        return positions.to(device), meta

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
        sampled = self.sampler.sample(logits[sample_rows].float(), sampled_ids) if sampled_ids else []
        prompt = []
        for i, first, count in prompt_rows:
            position = batch.context_lens[i] - batch.query_lens[i]
            prompt.append(self.sampler.prompt_logprobs(logits[first : first + count].float(), batch.seq_ids[i], position + 1))
        return StepResult(sampled=sampled, prompt_logprobs=prompt)
