"""Reading slices of safetensors tensors straight from the file into their destination.

The format is an 8-byte header length, a JSON header (dtype, shape and data offsets of every
tensor) and the raw row-major data. A slice of rows is one contiguous byte range and is read
with one `preadv` into the parameter's own memory; a slice of columns is one range per row.
Nothing is memory-mapped, so the page cache is never counted in the process's resident memory
and host memory peaks at the weights themselves (`safe_open(...).get_slice` maps the file: a
whole-file read then holds the weights twice).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from parallel.errors import WeightLoadError
from parallel.weights import Index
from workers.read_stats import ReadStats, slice_bounds, tensor_spans

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20


def read_header(path: str) -> tuple[int, dict]:
    """The JSON header of a safetensors file (without `__metadata__`) and where its data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < length <= MAX_HEADER:
            raise WeightLoadError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except json.JSONDecodeError as exc:
            raise WeightLoadError(f"{path} is not a safetensors file (its header is not JSON: {exc})") from exc
    header.pop("__metadata__", None)
    return 8 + length, header


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _pread_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise WeightLoadError(f"{path} ends early: the file is truncated or still being written")
        done += n


class _OpenFile:
    """A read-only file descriptor, closed when the last tensor source holding it is dropped."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass
class SafetensorsSource:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    _handle: _OpenFile
    _base: int
    _stats: ReadStats

    def read(self, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        bounds = slice_bounds(index, self.shape)
        spans = tensor_spans(self._base, self.shape, self.dtype.itemsize, bounds)
        self._stats.record(self.file, self.name, spans)
        shape = tuple(hi - lo for lo, hi in bounds)
        direct = out is not None and out.device.type == "cpu" and out.dtype == self.dtype and out.is_contiguous()
        target = out if direct else torch.empty(shape, dtype=self.dtype)
        if target.shape != shape:
            raise ValueError(f"cannot read a {shape} slice of {self.name} into a {tuple(target.shape)} tensor")
        view, done = _byte_view(target.reshape(-1)), 0
        for start, stop in spans:
            _pread_into(self._handle.fd, view[done : done + stop - start], start, self.file)
            done += stop - start
        if out is not None and not direct:
            return out.copy_(target)
        return target


def iter_safetensors(path: str, stats: ReadStats) -> Iterator[SafetensorsSource]:
    """Every tensor of one safetensors file; the file stays open while any of them is referenced."""
    data_start, header = read_header(path)
    handle = _OpenFile(path)
    for name, meta in header.items():
        if meta["dtype"] not in DTYPES:
            raise WeightLoadError(f"tensor {name!r} in {path} has dtype {meta['dtype']}, which shardlm cannot load")
        offset = data_start + meta["data_offsets"][0]
        yield SafetensorsSource(name, path, tuple(meta["shape"]), DTYPES[meta["dtype"]], handle, offset, stats)


def tensor_bytes(path: str) -> int:
    _, header = read_header(path)
    return sum(m["data_offsets"][1] - m["data_offsets"][0] for m in header.values())
