"""CUDA graphs of the decode step: captured once per batch-size bucket after the KV pool exists,
replayed for every step whose tokens are all decodes.

A graph replays fixed kernels on fixed memory, so each bucket's inputs live in static buffers
(ids, positions, slot mapping, context lengths, block tables) that a step copies into. A step of
n decodes runs the graph of the smallest bucket >= n; rows n.. are padding: their slot is slot 0
of the null block (block 0, which no kernel reads: attention is masked by context lengths) and
their context length is 1. Every bucket shares one memory pool, captured largest first.

Until the graphs have run on a GPU in a session they stay off by default: SHARDLM_CUDA_GRAPHS=1
turns them on, `enforce_eager=True` keeps them off whatever the environment says.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from workers.config import EngineConfig
from workers.models.layers import PagedMetadata

CUDA_GRAPHS_ENV = "SHARDLM_CUDA_GRAPHS"
MAX_BUCKET = 512
POOL_MARGIN_BYTES = 64 * 2**20
"""Reserved for the graphs' pool beyond the estimate of its activations (cuBLAS workspaces, alignment)."""


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured at: 1, 2, 4, 8, then multiples of 8 up to
    min(max_num_seqs, 512) (the last rounded up to a multiple of 8, so every batch up to it has one)."""
    top = min(max_num_seqs, MAX_BUCKET)
    sizes = [b for b in (1, 2, 4, 8) if b <= top]
    sizes += list(range(16, top + 1, 8))
    if top > sizes[-1]:
        sizes.append(min(MAX_BUCKET, -(-top // 8) * 8))
    return sizes


def cuda_graphs_wanted(config: EngineConfig) -> tuple[bool, str]:
    """Whether to capture decode graphs, and why (for the log)."""
    if config.model.device != "cuda":
        return False, "not on CUDA"
    if config.model.enforce_eager:
        return False, "enforce_eager=True"
    if os.environ.get(CUDA_GRAPHS_ENV, "").strip() == "1":
        return True, f"{CUDA_GRAPHS_ENV}=1"
    return False, f"eager until CUDA graphs have run on a GPU: set {CUDA_GRAPHS_ENV}=1 to try them"


def pool_reserve_bytes(peak_activation_bytes: int, profiled_tokens: int, max_num_seqs: int) -> int:
    """What the memory profile sets aside for the graphs' pool: the activations of the largest
    bucket's step (activations grow with the tokens of a step, so the profiled step's, scaled by
    the bucket's share of its tokens), plus a margin. The pool is apart from the allocator's
    cache, so the profile's peak does not cover it."""
    largest = decode_buckets(max_num_seqs)[-1]
    scaled = peak_activation_bytes * min(1.0, largest / max(1, profiled_tokens))
    return int(scaled) + POOL_MARGIN_BYTES


class DecodeGraphs:
    """One captured graph per bucket over shared static inputs; `run` replays the right one."""

    def __init__(self, model: Any, sizes: list[int], max_blocks_per_seq: int, device: torch.device) -> None:
        self.model, self.sizes, self.device = model, sorted(sizes), device
        top = self.sizes[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slots = torch.zeros(top, dtype=torch.long, device=device)
        self.context = torch.ones(top, dtype=torch.int32, device=device)
        self.tables = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool_bytes = 0

    def meta(self, batch: int) -> PagedMetadata:
        """The attention metadata of a decode-only step of `batch` rows, over the static buffers."""
        return PagedMetadata(
            slot_mapping=self.slots[:batch],
            num_decodes=batch,
            decode_block_tables=self.tables[:batch],
            decode_context_lens=self.context[:batch],
            prefill_block_tables=self.tables[:0],
            prefill_query_start=self.context[:1] * 0,
            prefill_context_lens=self.context[:0],
            max_prefill_query_len=0,
        )

    @torch.inference_mode()
    def capture(self) -> int:
        """Capture every bucket, largest first into one pool; the device memory they took."""
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self.meta(size)
            side = torch.cuda.Stream(self.device)  # kernels compile and allocate outside the capture
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.model(self.ids[:size], self.positions[:size], meta)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.ids[:size], self.positions[:size], meta)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.pool_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        return self.pool_bytes

    def bucket(self, rows: int) -> int | None:
        """The smallest captured batch size that holds `rows` decodes (None: larger than any)."""
        return next((size for size in self.sizes if size >= rows), None) if self.graphs else None

    def can_run(self, meta: PagedMetadata, tokens: int) -> bool:
        """Whether a step is decodes only and a bucket holds it."""
        return meta.num_decodes == tokens and self.bucket(tokens) is not None

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: PagedMetadata) -> torch.Tensor:
        """The model's hidden states [n, hidden] for a decode-only step, by replaying its bucket."""
        n = ids.shape[0]
        size = self.bucket(n)
        width = meta.decode_block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:size].zero_()  # padding writes to the null block, never over a sequence's slot
        self.context[:n].copy_(meta.decode_context_lens)
        self.context[n:size].fill_(1)
        self.tables[:n, :width].copy_(meta.decode_block_tables)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
