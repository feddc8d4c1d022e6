"""Reading slices of safetensors tensors straight from the file into their destination.

The format is an 8-byte header length, a JSON header (dtype, shape and data offsets of every
tensor) and the raw row-major data. A slice of rows is one contiguous byte range and a slice
of columns one range per row; they are read into the parameter's own memory through the load
pipeline (`workers.load_pipeline`) or, without one, by one synchronous `preadv` per range.
Nothing is memory-mapped, so the page cache is never counted in the process's resident memory
and host memory peaks at the weights themselves (`safe_open(...).get_slice` maps the file: a
whole-file read then holds the weights twice).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from parallel.errors import WeightLoadError
from parallel.weights import Index
from workers.load_pipeline import CheckpointFile, LoadPipeline, byte_view, pread_exact
from workers.read_stats import ReadStats, slice_bounds, tensor_spans

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
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


@dataclass
class SafetensorsSource:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    _handle: CheckpointFile
    _base: int
    _stats: ReadStats
    _pipeline: LoadPipeline | None = None
    """Where reads go; None: the plain path, one synchronous `preadv` per span."""

    def read(self, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._read(index, out, final=False)

    def read_final(self, index: Index, out: torch.Tensor) -> torch.Tensor:
        """`read` into a parameter's own storage: through a pipeline, the bytes may land later,
        before the pipeline finishes (see `parallel.weights.read_final`)."""
        return self._read(index, out, final=True)

    def _read(self, index: Index, out: torch.Tensor | None, final: bool) -> torch.Tensor:
        bounds = slice_bounds(index, self.shape)
        spans = tensor_spans(self._base, self.shape, self.dtype.itemsize, bounds)
        self._stats.record(self.file, self.name, spans)
        shape = tuple(hi - lo for lo, hi in bounds)
        if out is not None and tuple(out.shape) != shape:
            raise ValueError(f"cannot read a {shape} slice of {self.name} into a {tuple(out.shape)} tensor")
        if self._pipeline is None:
            return self._read_plain(spans, shape, out)
        direct = out is not None and out.dtype == self.dtype and out.is_contiguous()
        if direct and final:
            self._pipeline.submit(self._handle, spans, out)
            return out
        device = out.device if out is not None else torch.device("cpu")
        target = out if direct else torch.empty(shape, dtype=self.dtype, device=device)
        self._pipeline.read(self._handle, spans, target)
        return target if out is None or direct else out.copy_(target)

    def _read_plain(self, spans: list[tuple[int, int]], shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
        direct = out is not None and out.device.type == "cpu" and out.dtype == self.dtype and out.is_contiguous()
        target = out if direct else torch.empty(shape, dtype=self.dtype)
        view, done = byte_view(target), 0
        for start, stop in spans:
            pread_exact(self._handle.fd, [view[done : done + stop - start]], start, self._handle)
            done += stop - start
        if out is not None and not direct:
            return out.copy_(target)
        return target


def iter_safetensors(path: str, stats: ReadStats, pipeline: LoadPipeline | None = None) -> Iterator[SafetensorsSource]:
    """Every tensor of one safetensors file, read through `pipeline` (None: the plain path); the
    file stays open while any of them is referenced."""
    data_start, header = read_header(path)
    handle = CheckpointFile(path)
    for name, meta in header.items():
        if meta["dtype"] not in DTYPES:
            raise WeightLoadError(f"tensor {name!r} in {path} has dtype {meta['dtype']}, which shardlm cannot load")
        offset = data_start + meta["data_offsets"][0]
        yield SafetensorsSource(name, path, tuple(meta["shape"]), DTYPES[meta["dtype"]], handle, offset, stats, pipeline)


def tensor_bytes(path: str) -> int:
    _, header = read_header(path)
    return sum(m["data_offsets"][1] - m["data_offsets"][0] for m in header.values())
