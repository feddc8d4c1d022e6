"""Accounting of what a rank reads from storage: bytes copied and 4 KiB file pages touched."""

from __future__ import annotations

from dataclasses import dataclass, field

from parallel.weights import Index

PAGE = 4096


@dataclass
class ReadStats:
    """What a rank read from storage while loading."""

    bytes_read: int = 0
    """Bytes copied out of checkpoint files (quantized bytes for GGUF, before dequantizing)."""
    tensors: set[str] = field(default_factory=set)
    """Checkpoint tensors read from, wholly or in part."""
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Byte ranges [start, stop) read, per file."""

    def record(self, file: str, name: str, spans: list[tuple[int, int]]) -> None:
        self.tensors.add(name)
        self.bytes_read += sum(stop - start for start, stop in spans)
        self.spans.setdefault(file, []).extend(spans)

    def pages_touched(self) -> int:
        """How many distinct 4 KiB file pages the recorded byte ranges cover."""
        total = 0
        for spans in self.spans.values():
            end = -1
            for start, stop in sorted(spans):
                if stop <= start:
                    continue
                first, last = start // PAGE, (stop - 1) // PAGE
                if last > end:
                    total += last - max(first, end + 1) + 1
                    end = last
        return total


def slice_bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) for each dimension of `shape`, from an index of step-1 slices."""
    bounds = []
    for dim, size in enumerate(shape):
        part = index[dim] if dim < len(index) else slice(None)
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"slices must have step 1, got {part}")
        bounds.append((start, max(start, stop)))
    return bounds


def matrix_spans(base: int, rows: tuple[int, int], row_bytes: int, cols: tuple[int, int]) -> list[tuple[int, int]]:
    """Byte ranges read when rows [r0, r1) and byte columns [c0, c1) of a row-major matrix are read.

    Whole rows read as one range; a column slice reads one range per row.
    """
    (r0, r1), (c0, c1) = rows, cols
    if r1 <= r0 or c1 <= c0:
        return []
    if c0 == 0 and c1 == row_bytes:
        return [(base + r0 * row_bytes, base + r1 * row_bytes)]
    return [(base + r * row_bytes + c0, base + r * row_bytes + c1) for r in range(r0, r1)]


def tensor_spans(base: int, shape: tuple[int, ...], itemsize: int, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of a slice of a row-major tensor; only its first two dimensions may be sliced."""
    if len(shape) <= 1:
        lo, hi = bounds[0] if bounds else (0, 1)
        return [(base + lo * itemsize, base + hi * itemsize)] if hi > lo else []
    if any(b != (0, size) for b, size in zip(bounds[2:], shape[2:])):
        raise ValueError("only the first two dimensions of a checkpoint tensor can be sliced")
    inner = itemsize
    for size in shape[2:]:
        inner *= size
    return matrix_spans(base, bounds[0], shape[1] * inner, (bounds[1][0] * inner, bounds[1][1] * inner))
