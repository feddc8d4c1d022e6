"""A GGUF file's header and metadata, read without torch or numpy: the engine's index
(`workers.gguf_file`) and the checks made before Ray starts (`driver.entrypoints.llm`) read them alike."""

from __future__ import annotations

import mmap
import struct
from typing import Any

from parallel.errors import WeightLoadError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
SMALL_ARRAY = 64
"""Arrays up to this long are kept as lists; a longer one (the vocabulary) appears as its length."""


class Cursor:
    """Little-endian GGUF values read one after another from a buffer."""

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            return self.array()
        raise ValueError(f"unknown GGUF value type {vtype}")

    def array(self) -> list | int:
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if count <= SMALL_ARRAY:
            return [self.value(etype) for _ in range(count)]
        if etype in SCALARS:
            self.pos += count * struct.calcsize(SCALARS[etype])
        else:
            for _ in range(count):
                self.value(etype)
        return count


def read_header(buf: Any, path: str) -> tuple[int, int, int, Cursor]:
    """(version, tensor count, metadata count, a cursor at the first metadata key)."""
    if bytes(buf[:4]) != b"GGUF":
        raise WeightLoadError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    cur = Cursor(buf, 4)
    return cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q"), cur


def read_metadata(cur: Cursor, count: int, arrays: bool = True) -> dict[str, Any]:
    """`count` metadata entries from `cur` (with `arrays=False`, array entries are left out)."""
    metadata: dict[str, Any] = {}
    for _ in range(count):
        key = cur.string()
        vtype = cur.unpack("<I")
        value = cur.value(vtype)
        if arrays or vtype != ARRAY:
            metadata[key] = value
    return metadata


def read_gguf_scalars(path: str) -> dict[str, Any]:
    """A GGUF file's scalar and string metadata (arrays left out)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _, _, count, cur = read_header(buf, path)
        return read_metadata(cur, count, arrays=False)
