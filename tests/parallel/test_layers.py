"""Parallel layers: each rank's weight loader reads exactly its slice, and the slices make the whole.

Loading never communicates, so every rank of a group can be built and loaded in one process; the
partition maths is checked by combining the ranks' partial results as the collectives would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from parallel.errors import ConfigError
from parallel.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from parallel.state import TensorParallelGroup
from workers.read_stats import ReadStats
from workers.safetensors_file import iter_safetensors

torch.manual_seed(0)
HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTER, VOCAB = 48, 8, 6, 2, 36, 200
TENSORS = {
    "q": torch.randn(HEADS * HEAD_DIM, HIDDEN),
    "k": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN),
    "v": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN),
    "q_bias": torch.randn(HEADS * HEAD_DIM),
    "gate": torch.randn(INTER, HIDDEN),
    "up": torch.randn(INTER, HIDDEN),
    "down": torch.randn(HIDDEN, INTER),
    "down_bias": torch.randn(HIDDEN),
    "embed": torch.randn(VOCAB, HIDDEN),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("layers") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in TENSORS.items()}, path)
    return path


def sources(path: Path, stats: ReadStats | None = None) -> dict:
    return {s.name: s for s in iter_safetensors(str(path), stats or ReadStats())}


def group(rank: int, size: int) -> TensorParallelGroup:
    return TensorParallelGroup(rank=rank, size=size)


@pytest.mark.parametrize("size", [1, 2, 6])
def test_qkv_rows_per_rank(checkpoint: Path, size: int) -> None:
    src = sources(checkpoint)
    qs, ks = [], []
    for rank in range(size):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, group(rank, size))
        for shard in "qkv":
            layer.weight.weight_loader(layer.weight, src[shard], shard)
        q, k, v = layer.weight.split([layer.shards[s].size for s in "qkv"])
        qs.append(q)
        ks.append(k)
        kv_head = rank * KV_HEADS // size if size <= KV_HEADS else rank // (size // KV_HEADS)
        kv_heads = max(1, KV_HEADS // size)
        rows = slice(kv_head * HEAD_DIM, (kv_head + kv_heads) * HEAD_DIM)
        assert torch.equal(k, TENSORS["k"][rows]) and torch.equal(v, TENSORS["v"][rows])
        assert layer.num_heads == HEADS // size and layer.num_kv_heads == kv_heads
    assert torch.equal(torch.cat(qs), TENSORS["q"])
    replicas = max(1, size // KV_HEADS)
    assert torch.equal(torch.cat(ks[::replicas]), TENSORS["k"])


def test_qkv_bias_follows_the_weight_rows(checkpoint: Path) -> None:
    src = sources(checkpoint)
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, True, group(1, 2))
    layer.bias.weight_loader(layer.bias, src["q_bias"], "q")
    assert torch.equal(layer.bias[: 3 * HEAD_DIM], TENSORS["q_bias"][3 * HEAD_DIM :])


def test_layouts_that_cannot_split_are_refused_in_vllm_words() -> None:
    with pytest.raises(
        ConfigError, match=r"Total number of attention heads \(6\) must be divisible by tensor parallel size \(4\)\."
    ):
        QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, group(0, 4))
    with pytest.raises(
        ConfigError, match=r"Tensor parallel size \(3\) must be divisible by the total number of key/value heads \(2\)"
    ):
        QKVParallelLinear(HIDDEN, HEAD_DIM, 3, KV_HEADS, False, group(0, 3))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_mlp_partial_sums_make_the_whole(checkpoint: Path, size: int) -> None:
    """down(silu(gate x) * up x) = sum over ranks of down_r(silu(gate_r x) * up_r x), plus the bias once."""
    src = sources(checkpoint)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    partials = []
    for rank in range(size):
        tp = group(rank, size)
        gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], False, tp)
        gate_up.weight.weight_loader(gate_up.weight, src["gate"], 0)
        gate_up.weight.weight_loader(gate_up.weight, src["up"], 1)
        down = RowParallelLinear(INTER, HIDDEN, True, tp)
        down.weight.weight_loader(down.weight, src["down"], None)
        down.bias.weight_loader(down.bias, src["down_bias"], None)
        gate, up = gate_up(x).chunk(2, dim=-1)
        partials.append(F.linear(F.silu(gate) * up, down.weight))
    expected = F.linear(F.silu(x @ TENSORS["gate"].T) * (x @ TENSORS["up"].T), TENSORS["down"], TENSORS["down_bias"])
    # float32 sums of ~36 products of unit-scale values, taken in another order: a few ulps of ~100
    torch.testing.assert_close(sum(partials) + down.bias, expected, atol=1e-4, rtol=1e-5)


def test_column_parallel_reads_only_its_rows(checkpoint: Path) -> None:
    stats = ReadStats()
    src = sources(checkpoint, stats)
    layer = ColumnParallelLinear(HIDDEN, INTER, False, group(2, 3))
    layer.weight.weight_loader(layer.weight, src["gate"], None)
    assert torch.equal(layer.weight, TENSORS["gate"][24:36])
    assert stats.bytes_read == 12 * HIDDEN * 4


@pytest.mark.parametrize("size", [1, 2, 3])
def test_vocab_parallel_embedding_and_lm_head(checkpoint: Path, size: int) -> None:
    src = sources(checkpoint)
    ids = torch.tensor([0, 5, 63, 64, 130, 199])
    hidden = torch.randn(3, HIDDEN)
    embedded, logits = [], []
    for rank in range(size):
        embedding = VocabParallelEmbedding(VOCAB, HIDDEN, group(rank, size))
        embedding.weight.weight_loader(embedding.weight, src["embed"], None)
        start, stop = embedding.vocab_start, embedding.vocab_stop
        assert embedding.weight.shape[0] % 64 == 0 and embedding.weight.shape[0] * size >= VOCAB
        assert torch.all(embedding.weight[max(0, stop - start) :] == 0), "padding rows are zero"
        outside = (ids < start) | (ids >= stop)
        local = F.embedding(torch.where(outside, 0, ids - start), embedding.weight).masked_fill(outside[:, None], 0)
        embedded.append(local)
        head = ParallelLMHead(VOCAB, HIDDEN, group(rank, size))
        head.tie_to(embedding)
        logits.append(F.linear(hidden, head.weight))
    torch.testing.assert_close(sum(embedded), TENSORS["embed"][ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :VOCAB], hidden @ TENSORS["embed"].T, atol=1e-5, rtol=1e-5)


def test_collectives_without_a_process_group_refuse_to_run() -> None:
    tp = group(0, 2)
    with pytest.raises(RuntimeError, match="no process group"):
        tp.all_reduce(torch.ones(2))
    single = TensorParallelGroup.single()
    assert torch.equal(single.all_reduce(torch.ones(2)), torch.ones(2))
    assert torch.equal(single.gather_last_dim(torch.ones(2)), torch.ones(2))
