"""Checkpoint readers: every tensor of a checkpoint as a `WeightSource` that reads by slices.

Three formats, one contract (`parallel.weights.WeightSource`), each accounting its reads in a
`ReadStats` (bytes copied and the 4 KiB file pages they lie on):
- safetensors (`workers.safetensors_file`): byte ranges read straight into the parameter.
- GGUF (`workers.gguf_file`): rows and quantization blocks read, then dequantized.
- `.bin` / `.pt` (here): `torch.load(weights_only=True, mmap=True)`; a slice is a view of the
  mapped file, copied by the parameter's loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from parallel.errors import WeightLoadError
from parallel.weights import Index, WeightSource
from workers import safetensors_file
from workers.gguf_file import iter_gguf, read_gguf_index
from workers.load_pipeline import LoadPipeline
from workers.read_stats import ReadStats, slice_bounds, tensor_spans


@dataclass
class TorchFileSource:
    name: str
    file: str
    shape: tuple[int, ...]
    _tensor: torch.Tensor
    _stats: ReadStats

    def read(self, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        bounds = slice_bounds(index, self.shape)
        itemsize = self._tensor.element_size()
        base = self._tensor.storage_offset() * itemsize
        # torch does not tell where a storage lies in the file: pages are counted per tensor.
        self._stats.record(f"{self.file}::{self.name}", self.name, tensor_spans(base, self.shape, itemsize, bounds))
        values = self._tensor[tuple(slice(lo, hi) for lo, hi in bounds)]
        return values.clone() if out is None else out.copy_(values)


def _load_torch_file(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for unsafe or corrupt pickles
        raise WeightLoadError(
            f"cannot load {path} with torch.load(weights_only=True): {exc}. shardlm never runs code "
            "from a weights file; convert the checkpoint to safetensors"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightLoadError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}


def _iter_torch_file(path: str, stats: ReadStats) -> Iterator[TorchFileSource]:
    for name, tensor in _load_torch_file(path).items():
        yield TorchFileSource(name, path, tuple(tensor.shape), tensor, stats)


def iter_checkpoint(
    folder: str, files: tuple[str, ...], weight_format: str, stats: ReadStats, pipeline: LoadPipeline | None = None
) -> Iterator[WeightSource]:
    """Every tensor of the checkpoint as a `WeightSource`, file by file, reading through
    `pipeline` where the format's reader takes one (None: each read at once, on this thread)."""
    readers = {"safetensors": safetensors_file.iter_safetensors, "pt": _iter_torch_file, "gguf": iter_gguf}
    if weight_format not in readers:
        raise ValueError(f"unknown weight format {weight_format!r}")
    for file in files:
        path = os.path.join(folder, file)
        if weight_format in ("safetensors", "gguf"):
            yield from readers[weight_format](path, stats, pipeline)
        else:
            yield from readers[weight_format](path, stats)


def checkpoint_tensor_bytes(folder: str, files: tuple[str, ...], weight_format: str) -> int:
    """The bytes of all tensor data in the checkpoint, from the files' headers."""
    total = 0
    for file in files:
        path = os.path.join(folder, file)
        if weight_format == "safetensors":
            total += safetensors_file.tensor_bytes(path)
        elif weight_format == "gguf":
            total += sum(t.n_bytes for t in read_gguf_index(path).tensors.values())
        else:
            total += sum(t.numel() * t.element_size() for t in _load_torch_file(path).values())
    return total
