"""The load pipeline: a rank's file spans, merged into large reads, issued by reader threads.

Every checkpoint reader hands the pipeline byte ranges of a file and the tensor they fill.
The pipeline cuts them into pieces, sorts them in file order, merges pieces that lie end to end
in one file (or less than a page apart: the rows of a column slice) into one `preadv` with one
iovec per destination, splits large ones into chunks so that several threads share a big
tensor, and runs the reads on a pool of reader threads:

- CPU, page cache: `preadv` straight into the destination; threads share the first-touch page
  faults of freshly allocated parameters.
- CUDA, or O_DIRECT on any device: the read goes into one of a small ring of reusable staging
  buffers (pinned on CUDA, page-aligned for O_DIRECT); a `Copier` moves its bytes to the
  destination (on CUDA: asynchronously, on a side stream of the reader's own) and the buffer
  returns to the ring with the copy's completion handle; the next reader to take it waits on
  that handle first, so reading the next chunk overlaps copying the last.

Reads are either immediate (`read`: the bytes are in place when it returns, for temporaries
such as a row block about to be exchanged, or a slice about to be quantized) or deferred
(`submit`: the destination is a parameter's own storage, filled before `finish` returns).
Deferred pieces are dispatched in windows, so reading overlaps the loop that plans them.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import mmap
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from parallel.errors import WeightLoadError

logger = logging.getLogger(f"shardlm.{__name__}")

ALIGN = 4096
"""O_DIRECT offsets, lengths and buffers are aligned to this (a multiple of every common logical block size)."""
MAX_IOV = 512
"""Destinations per `preadv` (Linux allows 1024)."""
MAX_GAP = 4096
"""Pieces of a file this close together are read in one call, the bytes between them discarded."""
MiB = 2**20
LOAD_STRATEGIES = ("auto", "page_cache", "direct")
AUTO_DIRECT_MIN_BYTES = 256 * MiB
""""auto" never picks O_DIRECT for a rank that reads less than this: small reads gain nothing."""
AUTO_CACHED_SHARE = 0.5
""""auto" picks buffered reads when at least this share of the files' pages is in the page cache."""


# -- files ------------------------------------------------------------------------------------


class CheckpointFile:
    """A checkpoint file open for reading: a buffered descriptor, and an O_DIRECT one on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise WeightLoadError(f"cannot open checkpoint file {path}: {exc.strerror}") from exc
        self._direct_fd: int | None = None
        self._direct_failed = False
        self._lock = threading.Lock()

    def direct_fd(self) -> int | None:
        """An O_DIRECT descriptor, or None where the filesystem refuses O_DIRECT."""
        with self._lock:
            if self._direct_fd is None and not self._direct_failed:
                try:
                    self._direct_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                except OSError:
                    self._direct_failed = True
            return self._direct_fd

    def refuse_direct(self) -> None:
        """Stop using O_DIRECT for this file (the filesystem opened it but refuses the reads)."""
        with self._lock:
            self._direct_failed = True

    def close(self) -> None:
        for fd in (getattr(self, "fd", None), getattr(self, "_direct_fd", None)):
            if fd is not None:
                os.close(fd)
        self.fd = self._direct_fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _truncated(file: CheckpointFile, offset: int, wanted: int) -> WeightLoadError:
    try:
        size = os.fstat(file.fd).st_size
    except OSError:
        size = -1
    return WeightLoadError(
        f"{file.path} ends early: reading {wanted} bytes at offset {offset} found the file "
        f"{'gone' if size < 0 else f'{size} bytes long'}; it was truncated, replaced or is still being "
        "written: download or copy it again"
    )


def pread_exact(fd: int, buffers: list[memoryview], offset: int, file: CheckpointFile) -> None:
    """Fill `buffers` from `offset` on, however many calls `preadv` takes; a file that ends first
    is a `WeightLoadError` naming it and the offset."""
    pending = [b for b in buffers if len(b)]
    position = offset
    while pending:
        n = os.preadv(fd, pending, position)
        if n <= 0:
            raise _truncated(file, position, sum(len(b) for b in pending))
        position += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


# -- the copy to the destination --------------------------------------------------------------


class Copier(Protocol):
    """Moves a staging buffer's bytes to their destinations; how depends on the device."""

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A staging buffer of `nbytes` bytes (uint8), aligned for O_DIRECT."""
        ...

    def copy(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """Start copying each (source, destination) pair; a handle for `wait`, or None when done."""
        ...

    def wait(self, handle: Any) -> None:
        """Block until the copies behind `handle` are complete."""
        ...

    def finish(self) -> None:
        """Block until every copy started is complete, and visible to the device's default stream."""
        ...


class AlignedBuffers:
    """Page-aligned host buffers from anonymous memory maps (kept alive with their tensors)."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        mapped = mmap.mmap(-1, size)
        self._maps.append(mapped)
        return torch.frombuffer(mapped, dtype=torch.uint8)


class HostCopier(AlignedBuffers):
    """CPU destinations: the copy is a synchronous memcpy."""

    def copy(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for src, dst in pieces:
            dst.copy_(src)

    def wait(self, handle: Any) -> None:
        pass

    def finish(self) -> None:
        pass


class CudaCopier:
    """CUDA destinations: pinned staging buffers, copies on a side stream per reader thread, a CUDA
    event per buffer telling when it may be reused."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local = threading.local()
        self._streams: list[torch.cuda.Stream] = []
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(-(-nbytes // ALIGN) * ALIGN, dtype=torch.uint8, pin_memory=True)

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
            with self._lock:
                self._streams.append(stream)
        return stream

    def copy(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event:
        stream = self._stream()
        with torch.cuda.stream(stream):
            for src, dst in pieces:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def wait(self, handle: torch.cuda.Event | None) -> None:
        if handle is not None:
            handle.synchronize()

    def finish(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.synchronize()


@dataclass
class _Staging:
    buffer: torch.Tensor
    pending: Any = None
    """The handle of the copies still reading from this buffer."""


class StagingRing:
    """A fixed set of reusable staging buffers; a buffer is handed out again only after the copies
    that read it have completed."""

    def __init__(self, copier: Copier, count: int, nbytes: int) -> None:
        self.copier = copier
        self.nbytes = nbytes
        self._free: queue.Queue[_Staging] = queue.Queue()
        for _ in range(count):
            self._free.put(_Staging(copier.allocate(nbytes)))

    def acquire(self) -> _Staging:
        staging = self._free.get()
        if staging.pending is not None:
            self.copier.wait(staging.pending)
            staging.pending = None
        return staging

    def release(self, staging: _Staging, pending: Any) -> None:
        staging.pending = pending
        self._free.put(staging)


# -- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """`length` bytes of `file` at `offset`, to land at byte `dest_offset` of `dest` (flat uint8)."""

    file: CheckpointFile
    offset: int
    length: int
    dest: torch.Tensor
    dest_offset: int

    def target(self) -> torch.Tensor:
        return self.dest[self.dest_offset : self.dest_offset + self.length]


def pieces_for(file: CheckpointFile, spans: Iterable[tuple[int, int]], dest: torch.Tensor) -> list[Piece]:
    """The pieces that fill contiguous `dest` with the concatenation of the file's `spans`."""
    flat = dest.reshape(-1).view(torch.uint8)
    pieces, done = [], 0
    for start, stop in spans:
        if stop > start:
            pieces.append(Piece(file, start, stop - start, flat, done))
            done += stop - start
    if done != flat.numel():
        raise ValueError(f"spans of {done} bytes cannot fill a destination of {flat.numel()} bytes")
    return pieces


def split_pieces(pieces: Iterable[Piece], chunk: int) -> list[Piece]:
    """Pieces no longer than `chunk` bytes."""
    out = []
    for p in pieces:
        for start in range(0, p.length, chunk):
            n = min(chunk, p.length - start)
            out.append(Piece(p.file, p.offset + start, n, p.dest, p.dest_offset + start))
    return out


def merge_reads(pieces: Iterable[Piece], chunk: int, max_iov: int = MAX_IOV, max_gap: int = 0) -> list[list[Piece]]:
    """Group pieces into reads, in file order: each a run of pieces of one file that lie end to
    end, or with gaps of at most `max_gap` bytes between them (read along and discarded: a gap
    within a page costs no extra storage), spanning at most `chunk` bytes (a longer piece is
    split first) and holding at most `max_iov` pieces and gaps."""
    ordered = sorted(split_pieces(pieces, chunk), key=lambda p: (p.file.path, id(p.file), p.offset))
    reads: list[list[Piece]] = []
    first = iovs = 0
    for p in ordered:
        last = reads[-1][-1] if reads else None
        gap = p.offset - (last.offset + last.length) if last is not None and last.file is p.file else -1
        joins = 0 <= gap <= max_gap and p.offset + p.length - first <= chunk and iovs + 2 <= max_iov
        if joins:
            reads[-1].append(p)
            iovs += 2 if gap else 1
        else:
            reads.append([p])
            first, iovs = p.offset, 1
    return reads


def read_extent(pieces: list[Piece]) -> int:
    """Bytes from a read's first piece to the end of its last, gaps included."""
    return pieces[-1].offset + pieces[-1].length - pieces[0].offset


# -- choosing how to read ------------------------------------------------------------------------


def cached_fraction(path: str) -> float:
    """The share of the file's pages in the page cache now (`mincore` over a mapping of it that is
    never touched); 1.0 where that cannot be asked."""
    import ctypes
    import ctypes.util

    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 1.0
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return 1.0
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def supports_direct(path: str) -> bool:
    """Whether the file's filesystem takes an aligned O_DIRECT read."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buffer = mmap.mmap(-1, ALIGN)
        os.preadv(fd, [buffer], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StrategyChoice:
    strategy: str
    """"page_cache" or "direct": what the pipeline does."""
    reason: str
    """Why, in words, for the load report."""


def choose_strategy(asked: str, cached: float, direct_ok: bool, total_bytes: int) -> StrategyChoice:
    """What `safetensors_load_strategy` comes to, given the share of the files already cached, whether
    their filesystem takes O_DIRECT, and the bytes in them."""
    if asked not in LOAD_STRATEGIES:
        raise ValueError(f"load strategy {asked!r} is not one of {LOAD_STRATEGIES}")
    if asked == "page_cache":
        return StrategyChoice("page_cache", "asked for")
    if asked == "direct":
        if direct_ok:
            return StrategyChoice("direct", "asked for")
        return StrategyChoice("page_cache", "direct asked for, but the filesystem refuses O_DIRECT")
    if cached >= AUTO_CACHED_SHARE:
        return StrategyChoice("page_cache", f"auto: {cached:.0%} of the files is in the page cache")
    if total_bytes < AUTO_DIRECT_MIN_BYTES:
        return StrategyChoice("page_cache", f"auto: only {total_bytes / MiB:.0f} MiB to read")
    if not direct_ok:
        return StrategyChoice("page_cache", f"auto: {cached:.0%} cached, but the filesystem refuses O_DIRECT")
    return StrategyChoice("direct", f"auto: {cached:.0%} of the files is in the page cache")


def choose_for_files(asked: str, paths: list[str]) -> StrategyChoice:
    """`choose_strategy` for these files, measured (mincore, an O_DIRECT probe) only where "auto" needs it."""
    if asked == "page_cache" or not paths:
        return choose_strategy(asked, 1.0, False, 0)
    if asked == "direct":
        return choose_strategy(asked, 1.0, all(supports_direct(p) for p in paths), 0)
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    cached = sum(cached_fraction(p) * s for p, s in zip(paths, sizes)) / total if total else 1.0
    undecided = cached < AUTO_CACHED_SHARE and total >= AUTO_DIRECT_MIN_BYTES  # only then does O_DIRECT matter
    return choose_strategy(asked, cached, undecided and all(supports_direct(p) for p in paths), total)


def default_threads(device: torch.device) -> int:
    """Reader threads: on CUDA, enough to keep storage and the copy engine busy; on CPU, the
    rank's compute threads (each first-touch page fault costs CPU time)."""
    if device.type == "cuda":
        return max(2, min(8, len(os.sched_getaffinity(0))))
    return max(1, min(8, torch.get_num_threads()))


# -- the pipeline -------------------------------------------------------------------------------


@dataclass
class PipelineStats:
    """What the pipeline did, for the load report."""

    strategy: str = "page_cache"
    reason: str = ""
    threads: int = 1
    reads: int = 0
    """`preadv` calls issued (after merging)."""
    bytes: int = 0
    direct_fallbacks: list[str] = field(default_factory=list)


class LoadPipeline:
    """Reads of one rank's checkpoint files onto its device (see the module docstring)."""

    def __init__(
        self,
        device: torch.device,
        threads: int | None = None,
        strategy: StrategyChoice | None = None,
        chunk_bytes: int | None = None,
        window_bytes: int = 256 * MiB,
        copier: Copier | None = None,
        staging_buffers: int | None = None,
    ) -> None:
        self.device = device
        choice = strategy or StrategyChoice("page_cache", "default")
        self.direct = choice.strategy == "direct"
        self.threads = threads or default_threads(device)
        self.chunk = chunk_bytes or (16 * MiB if device.type == "cuda" or self.direct else 8 * MiB)
        self.window = window_bytes
        self.staged = device.type != "cpu" or self.direct or copier is not None
        self.copier: Copier = copier or (CudaCopier(device) if device.type == "cuda" else HostCopier())
        self._ring: StagingRing | None = None
        self._ring_count = staging_buffers or self.threads + 2
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="shardlm-read")
        self._scratch = memoryview(bytearray(MAX_GAP))
        """Where the bytes of the gaps between merged pieces go (never read)."""
        self._pending: list[Piece] = []
        self._pending_bytes = 0
        self._futures: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()
        self.stats = PipelineStats(strategy=choice.strategy, reason=choice.reason, threads=self.threads)

    # The two ways in.

    def read(self, file: CheckpointFile, spans: Iterable[tuple[int, int]], dest: torch.Tensor) -> torch.Tensor:
        """Fill contiguous `dest` (any device) with the file's `spans` now."""
        futures = self._dispatch(pieces_for(file, spans, dest))
        self._wait(futures)
        if self.staged:
            self.copier.finish()
        return dest

    def submit(self, file: CheckpointFile, spans: Iterable[tuple[int, int]], dest: torch.Tensor) -> None:
        """Fill contiguous `dest` with the file's `spans` before `finish` returns; nothing may read
        `dest` until then."""
        pieces = pieces_for(file, spans, dest)
        self._pending.extend(pieces)
        self._pending_bytes += sum(p.length for p in pieces)
        if self._pending_bytes >= self.window:
            self._flush()

    def finish(self) -> PipelineStats:
        """Complete every read submitted, then stop the reader threads."""
        try:
            self._flush()
            self._wait(self._futures)
            self.copier.finish()
        finally:
            self._futures = []
            self._pool.shutdown(wait=True, cancel_futures=True)
        return self.stats

    def close(self) -> None:
        """Stop without completing (after a failure elsewhere)."""
        self._pending = []
        self._pool.shutdown(wait=True, cancel_futures=True)

    # Dispatch.

    def _flush(self) -> None:
        pieces, self._pending, self._pending_bytes = self._pending, [], 0
        self._futures.extend(self._dispatch(pieces))

    def _dispatch(self, pieces: list[Piece]) -> list[concurrent.futures.Future]:
        reads = merge_reads(pieces, self.chunk, max_gap=MAX_GAP)
        if self.staged and self._ring is None:
            self._ring = StagingRing(self.copier, self._ring_count, self.chunk + 2 * ALIGN)
        run = self._read_staged if self.staged else self._read_into
        return [self._pool.submit(run, r) for r in reads]

    def _wait(self, futures: list[concurrent.futures.Future]) -> None:
        for future in futures:
            future.result()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes += nbytes

    # One read.

    def _read_into(self, pieces: list[Piece]) -> None:
        """Buffered `preadv` straight into the CPU destinations (gaps into a scratch buffer)."""
        views, whole, end = [], {}, pieces[0].offset
        for p in pieces:
            if p.offset > end:
                views.append(self._scratch[: p.offset - end])
            if id(p.dest) not in whole:
                whole[id(p.dest)] = byte_view(p.dest)
            views.append(whole[id(p.dest)][p.dest_offset : p.dest_offset + p.length])
            end = p.offset + p.length
        pread_exact(pieces[0].file.fd, views, pieces[0].offset, pieces[0].file)
        self._count(sum(p.length for p in pieces))

    def _read_staged(self, pieces: list[Piece]) -> None:
        """Read into a staging buffer, then copy each piece to its destination."""
        staging = self._ring.acquire()
        handle = None
        try:
            base = pieces[0].offset
            data = self._fill(staging.buffer, pieces[0].file, base, read_extent(pieces))
            copies = [(data[p.offset - base : p.offset - base + p.length], p.target()) for p in pieces]
            handle = self.copier.copy(copies)
        finally:
            self._ring.release(staging, handle)
        self._count(sum(p.length for p in pieces))

    def _fill(self, buffer: torch.Tensor, file: CheckpointFile, offset: int, length: int) -> torch.Tensor:
        """`length` bytes of `file` at `offset` in `buffer`; the part of the buffer that holds them."""
        fd = file.direct_fd() if self.direct else None
        if fd is not None:
            start = offset // ALIGN * ALIGN
            stop = -(-(offset + length) // ALIGN) * ALIGN
            try:
                got = _pread_direct(fd, byte_view(buffer)[: stop - start], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._note_fallback(file, exc)
            else:
                if got < offset + length - start:
                    raise _truncated(file, start + got, offset + length - start - got)
                return buffer[offset - start : offset - start + length]
        elif self.direct:
            self._note_fallback(file, None)
        pread_exact(file.fd, [byte_view(buffer)[:length]], offset, file)
        return buffer[:length]

    def _note_fallback(self, file: CheckpointFile, exc: OSError | None) -> None:
        file.refuse_direct()
        with self._lock:
            if file.path in self.stats.direct_fallbacks:
                return
            self.stats.direct_fallbacks.append(file.path)
            first = len(self.stats.direct_fallbacks) == 1
        if first:
            why = exc.strerror if exc is not None else "it cannot be opened with O_DIRECT"
            logger.warning("O_DIRECT reads of %s fail (%s): reading through the page cache instead", file.path, why)


def _pread_direct(fd: int, buffer: memoryview, offset: int) -> int:
    """Aligned O_DIRECT reads into `buffer` until it is full or the file ends; the bytes read."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            break
        done += n
        if n % ALIGN:  # a short, unaligned read is the end of the file
            break
    return done
