"""Checkpoint readers against the libraries that define the formats: safetensors, torch, gguf."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.checkpoint import checkpoint_tensor_bytes, iter_checkpoint
from workers.gguf_file import _unpermute_rotary, gguf_to_hf_name, read_gguf_index
from workers.read_stats import PAGE, ReadStats, matrix_spans

SLICES = [
    (slice(None), slice(None)),
    (slice(3, 17), slice(None)),
    (slice(None), slice(5, 40)),
    (slice(2, 9), slice(31, 33)),
    (slice(0, 0), slice(None)),
]


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    tensors = {
        "f32": torch.randn(20, 48),
        "bf16": torch.randn(20, 48).to(torch.bfloat16),
        "f16": torch.randn(20, 48).to(torch.float16),
        "vec": torch.randn(48),
        "i64": torch.arange(60).reshape(20, 3),
    }
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("index", SLICES)
def test_safetensors_slices_equal_safe_open(safetensors_file: Path, index) -> None:
    stats = ReadStats()
    sources = {s.name: s for s in iter_checkpoint(str(safetensors_file.parent), (safetensors_file.name,), "safetensors", stats)}
    with safe_open(safetensors_file, framework="pt") as f:
        for name in ("f32", "bf16", "f16", "i64"):
            expected = f.get_slice(name)[index]
            got = sources[name].read(index)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
            assert sources[name].read(index, out=torch.empty(expected.shape, dtype=torch.float64)).equal(expected.double())
        assert torch.equal(sources["vec"].read((slice(4, 9),)), f.get_slice("vec")[4:9])


def test_safetensors_bytes_read_are_the_slice_bytes(safetensors_file: Path) -> None:
    stats = ReadStats()
    sources = {s.name: s for s in iter_checkpoint(str(safetensors_file.parent), (safetensors_file.name,), "safetensors", stats)}
    sources["f32"].read((slice(3, 7), slice(10, 20)))
    sources["bf16"].read((slice(None), slice(None)))
    assert stats.bytes_read == 4 * 10 * 4 + 20 * 48 * 2
    assert stats.tensors == {"f32", "bf16"}


def test_read_into_out_writes_in_place(safetensors_file: Path) -> None:
    source = next(
        s
        for s in iter_checkpoint(str(safetensors_file.parent), (safetensors_file.name,), "safetensors", ReadStats())
        if s.name == "f32"
    )
    big = torch.zeros(30, 48)
    returned = source.read((slice(0, 10), slice(None)), out=big[5:15])
    with safe_open(safetensors_file, framework="pt") as f:
        assert torch.equal(big[5:15], f.get_slice("f32")[0:10])
    assert returned.data_ptr() == big[5:15].data_ptr()
    assert big[:5].abs().sum() == 0 and big[15:].abs().sum() == 0


def test_torch_file_slices(tmp_path: Path) -> None:
    state = {"a": torch.randn(12, 10), "b": torch.randn(7)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    stats = ReadStats()
    sources = {s.name: s for s in iter_checkpoint(str(tmp_path), ("pytorch_model.bin",), "pt", stats)}
    assert torch.equal(sources["a"].read((slice(2, 5), slice(1, 4))), state["a"][2:5, 1:4])
    assert torch.equal(sources["b"].read((slice(None),)), state["b"])
    assert stats.bytes_read == 3 * 3 * 4 + 7 * 4
    assert checkpoint_tensor_bytes(str(tmp_path), ("pytorch_model.bin",), "pt") == (120 + 7) * 4


def test_pages_touched_counts_distinct_pages() -> None:
    stats = ReadStats()
    stats.record("f", "a", [(0, 10), (5, 4096)])  # page 0 only
    stats.record("f", "b", [(4096 * 3 - 1, 4096 * 3 + 1)])  # pages 2 and 3
    stats.record("g", "c", [(0, 1)])
    assert stats.pages_touched() == 1 + 2 + 1
    assert stats.bytes_read == 10 + 4091 + 2 + 1


def test_column_slice_of_small_rows_touches_every_page() -> None:
    # 1024 rows of 1 KiB: half of each row still lies on every page of the tensor
    spans = matrix_spans(0, (0, 1024), 1024, (0, 512))
    stats = ReadStats()
    stats.record("f", "w", spans)
    assert stats.bytes_read == 1024 * 512
    assert stats.pages_touched() == 1024 * 1024 // PAGE


# ----------------------------------------------------------------------------------------------
# GGUF, on the real SmolLM2 file


@pytest.fixture(scope="module")
def gguf_reader(smollm2_gguf):
    import gguf

    return gguf.GGUFReader(smollm2_gguf)


def test_gguf_index_matches_gguf_reader(smollm2_gguf, gguf_reader) -> None:
    index = read_gguf_index(str(smollm2_gguf))
    assert len(index.tensors) == len(gguf_reader.tensors) == 272
    for t in gguf_reader.tensors:
        info = index.tensors[t.name]
        assert info.shape == tuple(reversed([int(n) for n in t.shape]))
        assert info.tensor_type == int(t.tensor_type)
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes
    for key in ("llama.block_count", "llama.attention.head_count_kv", "llama.rope.freq_base", "general.architecture"):
        assert index.metadata[key] == gguf_reader.fields[key].contents()
    assert index.metadata["tokenizer.ggml.tokens"] == len(gguf_reader.fields["tokenizer.ggml.tokens"].contents())


@pytest.mark.parametrize(
    "name,index",
    [
        ("token_embd.weight", (slice(100, 164), slice(None))),
        ("blk.0.ffn_down.weight", (slice(None), slice(512, 1024))),
        ("blk.0.ffn_down.weight", (slice(7, 9), slice(33, 95))),
        ("blk.3.attn_v.weight", (slice(64, 128), slice(None))),
        ("blk.0.attn_norm.weight", (slice(10, 20),)),
    ],
)
def test_gguf_slices_equal_dequantized_tensor(smollm2_gguf, gguf_reader, name, index) -> None:
    import gguf

    t = next(t for t in gguf_reader.tensors if t.name == name)
    whole = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    stats = ReadStats()
    source = next(
        s
        for s in iter_checkpoint(str(smollm2_gguf.parent), (smollm2_gguf.name,), "gguf", stats)
        if s.name == gguf_to_hf_name(name)
    )
    assert source.shape == tuple(whole.shape)
    assert torch.equal(source.read(index), whole[index])
    assert 0 < stats.bytes_read <= t.n_bytes


def test_gguf_rotary_rows_are_unpermuted_like_transformers(smollm2_gguf, gguf_reader) -> None:
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    t = next(t for t in gguf_reader.tensors if t.name == "blk.2.attn_k.weight")
    whole = gguf.quants.dequantize(t.data, t.tensor_type)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    expected = torch.from_numpy(processor.process(whole, t.name).weights.copy())
    source = next(
        s
        for s in iter_checkpoint(str(smollm2_gguf.parent), (smollm2_gguf.name,), "gguf", ReadStats())
        if s.name == "model.layers.2.self_attn.k_proj.weight"
    )
    assert torch.equal(source.read((slice(None), slice(None))), expected)
    assert torch.equal(source.read((slice(64, 128), slice(None))), expected[64:128])
    assert torch.equal(source.read((slice(70, 100), slice(None))), expected[70:100])


def test_unpermute_rotary_inverts_llama_cpp_permutation() -> None:
    heads, head_rows = 3, 8
    w = torch.arange(heads * head_rows * 2, dtype=torch.float32).reshape(heads * head_rows, 2)
    # llama.cpp's converter: reshape(heads, 2, half, ...) -> swap -> reshape
    permuted = w.reshape(heads, 2, head_rows // 2, 2).transpose(1, 2).reshape(w.shape)
    assert torch.equal(_unpermute_rotary(permuted, head_rows), w)
    assert not torch.equal(permuted, w)


def test_gguf_names() -> None:
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
