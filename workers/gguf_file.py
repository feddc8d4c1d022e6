"""GGUF files: a fast index, the model config in transformers' names, and tensors read by slices.

`gguf.GGUFReader` parses every element of every metadata array into numpy objects (seconds for a
50k-token vocabulary). Loading needs only the scalars and the tensor table, so the index reads
those and steps over the arrays. A slice reads only the rows, and the quantization blocks of the
columns, that it covers (through the load pipeline, onto the parameter's device), and
dequantizes them there in torch (`workers.gguf_dequant`; the gguf package for rarer types).
Tensor names become Hugging Face's, and llama.cpp's per-head interleaving of q/k rows is undone,
so the model sees the same tensors as from a safetensors checkpoint.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from parallel.errors import ConfigError, WeightLoadError
from parallel.weights import Index
from workers.gguf_dequant import dequantize, supported
from workers.gguf_metadata import read_header, read_metadata
from workers.load_pipeline import CheckpointFile, LoadPipeline
from workers.read_stats import ReadStats, matrix_spans, slice_bounds


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]
    """Torch order (outermost first): the reverse of GGUF's ne[]."""
    tensor_type: int
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    n_bytes: int
    row_bytes: int
    """Bytes per row of the last dimension (quantization blocks included)."""


@dataclass(frozen=True)
class GGUFIndex:
    path: str
    metadata: dict[str, object]
    """Scalars and small arrays; a large array (the vocabulary) appears as its length."""
    tensors: dict[str, GGUFTensorInfo]

    def data(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")


@functools.lru_cache(maxsize=8)
def _read_index(path: str, size: int, mtime: float) -> GGUFIndex:
    import gguf

    with open(path, "rb") as f:
        mapped = np.memmap(f, dtype=np.uint8, mode="r")
    version, n_tensors, n_kv, cur = read_header(memoryview(mapped), path)
    if version not in (2, 3):
        raise WeightLoadError(f"{path}: GGUF version {version} is not supported (2 and 3 are, little-endian)")
    metadata = read_metadata(cur, n_kv)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, ttype, offset in infos:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        row_bytes = dims[0] // block * block_bytes
        n_bytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), ttype, data_start + offset, n_bytes, row_bytes)
    return GGUFIndex(path, metadata, tensors)


def read_gguf_index(path: str) -> GGUFIndex:
    """The file's index; parsed once per process while the file is unchanged."""
    stat = os.stat(path)
    return _read_index(os.path.abspath(path), stat.st_size, stat.st_mtime)


GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
PERMUTED_ROTARY_ARCHS = ("llama", "mistral")
"""Architectures whose q/k rows llama.cpp's converter interleaves for its rotary layout."""

_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}


def gguf_model_config(index: GGUFIndex) -> dict[str, object]:
    """The model's config in transformers' names, from the GGUF metadata."""
    arch = str(index.metadata.get("general.architecture", ""))
    where = index.path
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
    config: dict[str, object] = {"model_type": arch, "hidden_act": "silu"}
    for key, name in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in index.metadata:
            config[name] = index.metadata[f"{arch}.{key}"]
    config.setdefault("vocab_size", index.metadata.get("tokenizer.ggml.tokens"))
    config["tie_word_embeddings"] = "output.weight" not in index.tensors
    config["use_sliding_window"] = "sliding_window" in config
    scaling = str(index.metadata.get(f"{arch}.rope.scaling.type", "none"))
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": index.metadata[f"{arch}.rope.scaling.factor"]}
    elif scaling != "none" or "rope_freqs.weight" in index.tensors:
        raise ConfigError(
            f"{where}: rope scaling {scaling if scaling != 'none' else 'by rope_freqs'} in a GGUF file is not "
            "supported yet; load the model's safetensors checkpoint instead"
        )
    return config


def permuted_rotary_heads(index: GGUFIndex) -> dict[str, int]:
    """Name suffix -> head count for the q/k weights whose rows llama.cpp interleaved ({} if none)."""
    arch = str(index.metadata.get("general.architecture", ""))
    if arch not in PERMUTED_ROTARY_ARCHS:
        return {}
    heads = int(index.metadata[f"{arch}.attention.head_count"])
    kv_heads = int(index.metadata.get(f"{arch}.attention.head_count_kv", heads))
    return {"self_attn.q_proj.weight": heads, "self_attn.k_proj.weight": kv_heads}


_GGUF_NAMES = [
    (re.compile(r"^token_embd\.(weight|bias)$"), r"model.embed_tokens.\1"),
    (re.compile(r"^output_norm\.(weight|bias)$"), r"model.norm.\1"),
    (re.compile(r"^output\.(weight|bias)$"), r"lm_head.\1"),
    (re.compile(r"^rope_freqs\.weight$"), r"rope_freqs.weight"),
]
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """A llama.cpp tensor name in Hugging Face's convention (unknown names are kept as they are)."""
    for pattern, replacement in _GGUF_NAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    match = _GGUF_BLOCK.match(name)
    if match and match.group(2) in _GGUF_BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[part]}.{kind}"
    return name


@dataclass
class GGUFSource:
    """A GGUF tensor. `rotary_heads` is set for q/k weights that llama.cpp permuted per head."""

    name: str
    file: str
    shape: tuple[int, ...]
    _info: GGUFTensorInfo
    _data: np.ndarray
    _stats: ReadStats
    rotary_heads: int | None = None
    _handle: CheckpointFile | None = None
    _pipeline: LoadPipeline | None = None
    """Where the quantized bytes are read; None: copied out of the memory-mapped file (the plain path)."""

    def read(self, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        device = out.device if out is not None and self._pipeline is not None else torch.device("cpu")
        values = self._read(slice_bounds(index, self.shape), device)
        return values if out is None else out.copy_(values)

    def _read(self, bounds: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        if self.rotary_heads is None:
            return self._read_plain(bounds, device)
        head_rows = self.shape[0] // self.rotary_heads
        (r0, r1), cols = bounds[0], bounds[1:]
        h0, h1 = r0 // head_rows * head_rows, -(-r1 // head_rows) * head_rows
        permuted = self._read_plain([(h0, h1), *cols], device)
        return _unpermute_rotary(permuted, head_rows)[r0 - h0 : r1 - h0]

    def _read_plain(self, bounds: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Read rows [r0, r1) and the quantization blocks covering columns [c0, c1) onto `device`,
        then dequantize them there."""
        import gguf

        info, qtype = self._info, gguf.GGMLQuantizationType(self._info.tensor_type)
        rows, cols = ((0, 1), bounds[0]) if len(self.shape) == 1 else (bounds[0], bounds[1])
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        b0, b1 = cols[0] // block, -(-cols[1] // block)
        byte_cols = (b0 * block_bytes, b1 * block_bytes)
        spans = matrix_spans(info.offset, rows, info.row_bytes, byte_cols)
        self._stats.record(self.file, self.name, spans)
        raw = self._raw(rows, byte_cols, spans, device)
        if supported(qtype):
            values = dequantize(raw, qtype)
        else:
            values = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw.cpu().numpy(), qtype), dtype=np.float32)).to(device)
        out = values[:, cols[0] - b0 * block : cols[1] - b0 * block].contiguous()
        return out.reshape(-1) if len(self.shape) == 1 else out

    def _raw(
        self, rows: tuple[int, int], byte_cols: tuple[int, int], spans: list[tuple[int, int]], device: torch.device
    ) -> torch.Tensor:
        """The quantized bytes [rows, byte columns] as a uint8 tensor on `device`."""
        shape = (rows[1] - rows[0], byte_cols[1] - byte_cols[0])
        if self._pipeline is None:
            start, stop = self._info.offset + rows[0] * self._info.row_bytes, self._info.offset + rows[1] * self._info.row_bytes
            return torch.from_numpy(
                np.array(self._data[start:stop].reshape(shape[0], self._info.row_bytes)[:, byte_cols[0] : byte_cols[1]])
            )
        raw = torch.empty(shape, dtype=torch.uint8, device=device)
        return self._pipeline.read(self._handle, spans, raw) if raw.numel() else raw


def _unpermute_rotary(w: torch.Tensor, head_rows: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleaving of q/k weights.

    llama.cpp stores the two rotary halves of each head interleaved (row 2j + t holds Hugging
    Face's row t * head_rows/2 + j); this puts them back in halves.
    """
    heads = w.shape[0] // head_rows
    return w.reshape(heads, head_rows // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf(path: str, stats: ReadStats, pipeline: LoadPipeline | None = None) -> Iterator[GGUFSource]:
    """Every tensor of a GGUF file, under its Hugging Face name, its bytes read through `pipeline`
    onto the destination's device and dequantized there (None: from the mapped file, on the CPU)."""
    index = read_gguf_index(path)
    data = index.data()
    handle = CheckpointFile(path) if pipeline is not None else None
    rotary_heads = permuted_rotary_heads(index)
    for info in index.tensors.values():
        name = gguf_to_hf_name(info.name)
        heads = next((h for suffix, h in rotary_heads.items() if name.endswith(suffix)), None)
        yield GGUFSource(name, path, info.shape, info, data, stats, heads, handle, pipeline)
