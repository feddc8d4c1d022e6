"""Tensor-parallel layers, each with a weight loader that reads only this rank's slice.

Notation: p ranks, this one r. A linear layer computes Y = X A^T + b with A of shape
[out_features, in_features], as torch and the checkpoints store it. The sharding rule fits in a
table: column-parallel splits A's rows (dimension 0, the outputs), row-parallel its columns
(dimension 1, the inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import onednn_linear
from parallel.errors import ConfigError
from parallel.quantization import QuantConfig, linear_method
from parallel.state import TensorParallelGroup, split_evenly
from parallel.weights import ShardId, WeightSource, attach_loader, full_index, read_final, replicated

VOCAB_PADDING = 64


def divide(numerator: int, tp_size: int, what: str) -> int:
    """`numerator / tp_size`, or a `ConfigError` in vLLM's words when it does not divide."""
    if numerator % tp_size:
        raise ConfigError(f"{what} ({numerator}) must be divisible by tensor parallel size ({tp_size}).")
    return numerator // tp_size


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of a checkpoint tensor, stored at `offset` in this rank's parameter."""

    full_rows: int
    start: int
    stop: int
    offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class ParallelLinear(nn.Module):
    """A linear layer's slice on one rank: output rows `out_shards` of its checkpoint tensors (one
    shard, or one per tensor fused into it) and input columns [in_start, in_stop).

    How the slice is stored and multiplied is its `LinearMethod`'s business (model dtype,
    quantized while loading, or 4-bit from the checkpoint: `parallel.quantization`); the layer
    says which part of each checkpoint tensor the rank owns and reads it (`read_weight`).
    """

    def __init__(
        self, in_features: int, shards: dict[ShardId, RowRange], in_range: tuple[int, int], quant: QuantConfig | None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_shards = shards
        self.in_start, self.in_stop = in_range
        self.local_out = sum(r.size for r in shards.values())
        self.local_in = self.in_stop - self.in_start
        self.method = linear_method(quant)
        self.method.create_weights(self)

    def weight_full_shapes(self) -> dict[ShardId, tuple[int, int]]:
        """The checkpoint shape of each shard's full-precision weight."""
        return {k: (r.full_rows, self.in_features) for k, r in self.out_shards.items()}

    def read_weight(self, source: WeightSource, shard_id: ShardId, out: torch.Tensor, final: bool = False) -> None:
        """Read this rank's part of shard `shard_id`'s weight (its rows x its columns) into `out`
        (`final`: out is the parameter's own storage, see `parallel.weights.read_final`)."""
        raise NotImplementedError

    def process_weights_after_loading(self) -> None:
        self.method.process_after_loading(self)

    def restore_after_loading(self) -> None:
        self.method.restore_after_loading(self)


class _RowSplitLinear(ParallelLinear):
    """A linear layer whose rows are split over the ranks, filled from one or more checkpoint tensors."""

    def __init__(self, in_features: int, shards: dict[ShardId, RowRange], bias: bool, quant: QuantConfig | None = None) -> None:
        super().__init__(in_features, shards, (0, in_features), quant)
        self.shards = shards
        self.bias = None
        if bias:
            self.bias = attach_loader(
                nn.Parameter(torch.empty(self.local_out), requires_grad=False),
                self.load_rows,
                {k: (r.full_rows,) for k, r in shards.items()},
            )

    def read_weight(self, source: WeightSource, shard_id: ShardId, out: torch.Tensor, final: bool = False) -> None:
        rows = self.shards[shard_id]
        index = (slice(rows.start, rows.stop), slice(None))
        read_final(source, index, out) if final else source.read(index, out=out)

    def load_rows(self, param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
        """Read this rank's rows of shard `shard_id` into their place in `param`."""
        rows = self.shards[shard_id]
        index = (slice(rows.start, rows.stop),) + full_index(param.dim() - 1)
        read_final(source, index, param.data.narrow(0, rows.offset, rows.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(_RowSplitLinear):
    """Y = X A^T + b with A split along its rows (the outputs): A = [A_1; ...; A_p].

    Rank r holds A_r and b_r and computes Y_r = X A_r^T + b_r, its slice of Y's last dimension;
    nothing is communicated.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup, quant: QuantConfig | None = None
    ) -> None:
        rows = divide(out_features, tp.size, f"Output size of {type(self).__name__}")
        super().__init__(in_features, {None: RowRange(out_features, tp.rank * rows, (tp.rank + 1) * rows, 0)}, bias, quant)


def _stacked(row_counts: dict[ShardId, tuple[int, int, int]]) -> dict[ShardId, RowRange]:
    """RowRanges for shards given as (full_rows, start, stop), stacked in order."""
    shards, offset = {}, 0
    for shard_id, (full_rows, start, stop) in row_counts.items():
        shards[shard_id] = RowRange(full_rows, start, stop, offset)
        offset += stop - start
    return shards


class MergedColumnParallelLinear(_RowSplitLinear):
    """Several column-parallel layers with the same input fused into one (gate_up_proj).

    With A = [G; U] (shards 0 and 1), rank r holds [G_r; U_r]: its slice of each.
    """

    def __init__(
        self, in_features: int, out_features: list[int], bias: bool, tp: TensorParallelGroup, quant: QuantConfig | None = None
    ) -> None:
        counts = {}
        for i, size in enumerate(out_features):
            rows = divide(size, tp.size, f"Output size {i} of {type(self).__name__}")
            counts[i] = (size, tp.rank * rows, (tp.rank + 1) * rows)
        super().__init__(in_features, _stacked(counts), bias, quant)


class QKVParallelLinear(_RowSplitLinear):
    """The query, key and value projections fused and split by attention heads.

    Rank r holds query heads [r h_q/p, (r+1) h_q/p). With h_kv >= p key/value heads, it holds
    heads [r h_kv/p, (r+1) h_kv/p) of each; with fewer (p a multiple of h_kv) it holds the one
    key/value head r // (p / h_kv), which p / h_kv ranks replicate.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TensorParallelGroup,
        quant: QuantConfig | None = None,
    ) -> None:
        q_heads = divide(num_heads, tp.size, "Total number of attention heads")
        if num_kv_heads >= tp.size:
            kv_heads = divide(num_kv_heads, tp.size, "Total number of key/value heads")
            first_kv = tp.rank * kv_heads
        else:
            if tp.size % num_kv_heads:
                raise ConfigError(
                    f"Tensor parallel size ({tp.size}) must be divisible by the total number of "
                    f"key/value heads ({num_kv_heads}) when it exceeds it."
                )
            kv_heads, first_kv = 1, tp.rank // (tp.size // num_kv_heads)
        q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
        kv = (kv_rows, first_kv * head_dim, (first_kv + kv_heads) * head_dim)
        counts = {"q": (q_rows, tp.rank * q_heads * head_dim, (tp.rank + 1) * q_heads * head_dim), "k": kv, "v": kv}
        super().__init__(hidden_size, _stacked(counts), bias, quant)
        self.num_heads, self.num_kv_heads, self.head_dim = q_heads, kv_heads, head_dim

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split this rank's fused output into its q, k and v."""
        sizes = [self.shards[s].size for s in ("q", "k", "v")]
        q, k, v = qkv.split(sizes, dim=-1)
        return q, k, v

    def heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """This rank's fused output [T, (h_q + 2 h_kv) d] as heads [T, h_q + 2 h_kv, d] (a view): its
        q heads, then its k heads, then its v heads."""
        return qkv.view(qkv.shape[0], -1, self.head_dim)


class RowParallelLinear(ParallelLinear):
    """Y = X A^T + b with A split along its columns (the inputs): A = [A_1 ... A_p].

    X arrives split along its last dimension as [X_1 ... X_p] (the output of a column-parallel
    layer); rank r computes X_r A_r^T, the partial sums are all-reduced and b, held whole by every
    rank, is added once after the reduction.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup, quant: QuantConfig | None = None
    ) -> None:
        cols = divide(in_features, tp.size, f"Input size of {type(self).__name__}")
        shards = {None: RowRange(out_features, 0, out_features, 0)}
        super().__init__(in_features, shards, (tp.rank * cols, (tp.rank + 1) * cols), quant)
        self.tp = tp
        self.bias = replicated(nn.Parameter(torch.empty(out_features), requires_grad=False)) if bias else None

    def read_weight(self, source: WeightSource, shard_id: ShardId, out: torch.Tensor, final: bool = False) -> None:
        """This rank's columns of the checkpoint tensor, read as a block of whole rows and
        exchanged with the other ranks (see `TensorParallelGroup.rows_to_columns`); a rank without
        a process group reads its columns directly."""
        if self.tp.size == 1 or self.tp.group is None:
            index = (slice(None), slice(self.in_start, self.in_stop))
            read_final(source, index, out) if final else source.read(index, out=out)
            return
        start, stop = split_evenly(out.shape[0], self.tp.size)[self.tp.rank]
        block = torch.empty(stop - start, self.in_features, dtype=out.dtype, device=out.device)
        source.read((slice(start, stop), slice(None)), out=block)
        out.copy_(self.tp.rows_to_columns(block, out.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.method.apply(self, x, None))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """An embedding table split along the vocabulary.

    The vocabulary V is padded to V' = p * 64 * ceil(V / 64p), so that each rank's share is a
    multiple of 64, and rank r holds rows [r V'/p, (r+1) V'/p); rows at or past V are padding and
    stay zero. A lookup embeds the ids
    that fall in this rank's range, zeroes the others, and all-reduces: each id is embedded by
    exactly one rank.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // (VOCAB_PADDING * tp.size)) * VOCAB_PADDING
        self.vocab_start = tp.rank * self.rows_per_rank
        self.vocab_stop = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = attach_loader(
            nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False),
            self.load_vocab_rows,
            {None: (vocab_size, embedding_dim)},
        )

    def load_vocab_rows(self, param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
        """Read this rank's vocabulary rows; zero its padding rows."""
        owned = max(0, self.vocab_stop - self.vocab_start)
        if owned:
            read_final(source, (slice(self.vocab_start, self.vocab_stop), slice(None)), param.data[:owned])
        param.data[owned:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_stop)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        embedded = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(embedded)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split along the vocabulary like the embedding it may share weights with.

    Rank r computes logits for its vocabulary rows, X W_r^T; rank 0 gathers them and drops the
    padding columns; the other ranks return None.
    """

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Use the embedding's weight (tie_word_embeddings): loaded once, stored once."""
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_last_dim(onednn_linear.module_linear(self, hidden, self.weight))
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., : self.vocab_size]
