"""All-reduce and gather through shared memory, for CPU ranks on one host.

gloo on CPU takes hundreds of microseconds per collective even for a few hundred bytes (a TCP
round trip through the kernel, and a wake-up of the other process). Ranks on one host can do the
same through one shared segment: each writes its tensor into its own slot, raises its flag, waits
until every rank's flag is up, and sums the slots, in rank order, so every rank gets the same bits.

Layout of the segment (every region 64-byte aligned, so that no two ranks write one cache line):

    [token: 64 bytes][rank r's line at 64 + 64 r: flag int64, pid int64][data: 2 slots x size ranks x capacity]

Rank r's flag is the number of the last collective it has written its data for (collectives are
numbered 1, 2, ... in the order every rank calls them). Collective g uses data slot g % 2. Before
writing there a rank waits until every flag is at least g - 1: every rank has then finished
collective g - 2, the last one to use that slot. The sum is read after every flag is at least g.

Memory order: a rank's data stores come before its flag store in program order, and x86-64 keeps
stores (and loads) in order, so a rank that sees the flag sees the data. Elsewhere this is not
promised without fences that Python cannot issue, so `supported()` is False there and gloo is used.

Every wait gives up after the group's timeout with `CollectiveTimeout`, naming the ranks that
did not arrive, and sooner with `PeerExited` when the process of a rank it waits for has ended
(gloo notices a closed socket at once; a flag that never rises would otherwise look like a slow rank).
"""

from __future__ import annotations

import mmap
import os
import time

import torch
import torch.distributed as dist

from parallel.errors import ShardLMError
from parallel.shm import Futex, alive, create_file, open_file, supported

ALIGN = 64
DEFAULT_CAPACITY_BYTES = 4 << 20
CAPACITY_ENV = "SHARDLM_SHM_ALLREDUCE_BYTES"
"""Bytes of one rank's slot: larger tensors go through gloo; "0" turns shared memory off."""
SPIN_S = 20e-6
"""How long a wait checks the flags without a system call before it sleeps on the lagging rank's flag."""
FUTEX_SLICE_S = 0.1
"""The longest one sleep on a flag lasts before the wait checks its deadline."""
MAX_CACHED_SHAPES = 256


class CollectiveTimeout(ShardLMError):
    """A rank waited longer than the group's timeout for the others in a shared-memory collective."""


class PeerExited(ShardLMError):
    """A rank's process ended while another waited for it in a shared-memory collective."""


def capacity_from_env() -> int:
    """Bytes of one rank's slot, from `SHARDLM_SHM_ALLREDUCE_BYTES` (0: no shared memory)."""
    value = os.environ.get(CAPACITY_ENV, "").strip()
    capacity = int(value) if value else DEFAULT_CAPACITY_BYTES
    return max(0, -(-capacity // ALIGN) * ALIGN)


def segment_bytes(size: int, capacity: int) -> int:
    return ALIGN * (1 + size) + 2 * size * capacity


class ShmCommunicator:
    """One rank's view of the shared segment of a group of `size` ranks on this host.

    Every rank must make the same calls in the same order with tensors of the same shape and
    dtype (as with any collective); `fits` says whether a tensor can take this path, and gives
    the same answer on every rank for the same shape and dtype.
    """

    def __init__(self, rank: int, size: int, buffer: mmap.mmap, capacity: int, timeout_s: float) -> None:
        self.rank, self.size, self.capacity, self.timeout_s = rank, size, capacity, timeout_s
        self._buffer = buffer
        self._flags = memoryview(buffer)[ALIGN : ALIGN * (1 + size)].cast("q")
        self._flag_index = [r * (ALIGN // 8) for r in range(size)]
        self._flags[self._flag_index[rank] + 1] = os.getpid()
        self.watch_pids = False
        """Whether waits check that the ranks they wait for still run (`join` sets it once every
        rank has seen every other's process)."""
        self._bytes = torch.frombuffer(buffer, dtype=torch.uint8, offset=ALIGN * (1 + size)).view(2, size, capacity)
        base = self._bytes.data_ptr() - ALIGN * (1 + size)
        self._flag_address = [base + ALIGN * (1 + r) for r in range(size)]
        """Where each flag is: its low 32 bits (x86-64 is little-endian) are the futex word."""
        self._futex = Futex()
        self._slot_cache: dict[tuple[torch.dtype, torch.Size], tuple[list[torch.Tensor], ...]] = {}
        """Both data slots' per-rank views, by dtype and shape (building them costs more than a small sum)."""
        self.generation = 0
        """The number of the last collective this rank took part in."""

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` can go through shared memory: a contiguous CPU tensor of at most `capacity` bytes."""
        return x.device.type == "cpu" and x.is_contiguous() and x.numel() * x.element_size() <= self.capacity

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks in place (added in rank order: the same bits on every rank)."""
        slots = self._exchange(x, wait_for_all=True)
        torch.add(slots[0], slots[1], out=x)
        for other in slots[2:]:
            x.add_(other)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x` concatenated along the last dimension on rank 0; None elsewhere."""
        slots = self._exchange(x, wait_for_all=self.rank == 0)
        if self.rank != 0:
            return None
        return torch.cat([x, *slots[1:]], dim=-1)

    def _exchange(self, x: torch.Tensor, wait_for_all: bool) -> list[torch.Tensor]:
        """Write `x` into this rank's slot of the next collective and raise the flag; with
        `wait_for_all`, wait for every rank's data. Every rank's slot, viewed with x's dtype and shape."""
        self.generation += 1
        g = self.generation
        slots = self._slots(x, g % 2)
        self._wait(g - 1, "reuse a buffer")
        slots[self.rank].copy_(x)
        self._flags[self._flag_index[self.rank]] = g
        self._futex.wake(self._flag_address[self.rank])
        if wait_for_all:
            self._wait(g, "collect the others' data")
        return slots

    def _slots(self, x: torch.Tensor, slot: int) -> list[torch.Tensor]:
        key = (x.dtype, x.shape)
        views = self._slot_cache.get(key)
        if views is None:
            if len(self._slot_cache) >= MAX_CACHED_SHAPES:
                self._slot_cache.clear()
            typed = self._bytes.view(x.dtype)[:, :, : x.numel()]
            views = self._slot_cache[key] = tuple([t.view(x.shape) for t in typed[s].unbind(0)] for s in (0, 1))
        return views[slot]

    def _lagging(self, generation: int) -> int | None:
        """The first rank whose flag is below `generation`, or None."""
        flags = self._flags
        for r, i in enumerate(self._flag_index):
            if flags[i] < generation:
                return r
        return None

    def _wait(self, generation: int, why: str) -> None:
        """Until every flag is at least `generation`: checks without a system call for SPIN_S,
        then sleeps on the flag of a rank still behind (it wakes the flag's sleepers when it
        raises it); CollectiveTimeout after `timeout_s`."""
        if generation <= 0 or self._lagging(generation) is None:
            return
        start = time.perf_counter()
        while (late := self._lagging(generation)) is not None:
            waited = time.perf_counter() - start
            if waited < SPIN_S:
                continue
            if waited > self.timeout_s:
                raise self._timeout(generation, why)
            seen = self._flags[self._flag_index[late]]
            if self.watch_pids and waited > FUTEX_SLICE_S and not alive(self.pid_of(late)):
                raise PeerExited(
                    f"rank {self.rank} of {self.size}: rank {late} (pid {self.pid_of(late)}) exited during shared-memory "
                    f"collective {self.generation} (waiting to {why})"
                )
            if seen < generation:
                self._futex.wait(self._flag_address[late], seen, min(FUTEX_SLICE_S, self.timeout_s - waited + 1e-3))

    def pid_of(self, rank: int) -> int:
        return self._flags[self._flag_index[rank] + 1]

    def peers_visible(self) -> bool:
        """Whether this process can see every rank's process (one pid namespace)."""
        return all(alive(self.pid_of(r)) for r in range(self.size))

    def _timeout(self, generation: int, why: str) -> CollectiveTimeout:
        late = [r for r, i in enumerate(self._flag_index) if self._flags[i] < generation]
        return CollectiveTimeout(
            f"rank {self.rank} of {self.size} waited {self.timeout_s:.0f} s in shared-memory collective {self.generation} "
            f"to {why}: rank(s) {late} did not arrive (dead, or stuck before it)"
        )

    def close(self) -> None:
        """Drop this rank's mapping (the segment's file is unlinked once every rank has mapped it);
        a tensor still viewing it keeps it mapped until the process ends."""
        self._slot_cache.clear()
        self._bytes = None
        self._flags.release()
        try:
            self._buffer.close()
        except BufferError:
            pass


# -- set-up ------------------------------------------------------------------------------------


def join(group: dist.ProcessGroup, rank: int, size: int, timeout_s: float, capacity: int | None = None) -> ShmCommunicator | None:
    """Collectively (every rank of `group` calls it): the shared-memory communicator of the group,
    or None on every rank when shared memory is off, unsupported here, or not shared by all ranks
    (another host, a full /dev/shm). Rank 0 unlinks the segment's file once all have mapped it."""
    capacity = capacity_from_env() if capacity is None else capacity
    if not supported() or capacity == 0:
        return None
    buffer, offer = None, [None]
    if rank == 0:
        try:
            path, token, buffer = create_segment(size, capacity)
            offer = [(path, token)]
        except OSError:
            pass
    dist.broadcast_object_list(offer, src=dist.get_global_rank(group, 0), group=group)
    if offer[0] is None:
        return None
    path, token = offer[0]
    if rank != 0:
        buffer = open_segment(path, token, size, capacity)
    mapped = torch.tensor([0 if buffer is None else 1], dtype=torch.int32)
    dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)
    if rank == 0:
        os.unlink(path)
    if not int(mapped):
        if buffer is not None:
            buffer.close()
        return None
    comm = ShmCommunicator(rank, size, buffer, capacity, timeout_s)
    dist.barrier(group=group)  # every rank's pid is in the segment now
    comm.watch_pids = _everyone(group, comm.peers_visible())
    return comm


def _everyone(group: dist.ProcessGroup, mine: bool) -> bool:
    """Whether `mine` is true on every rank (a collective: every rank calls it)."""
    flag = torch.tensor([1 if mine else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(int(flag))


def create_segment(size: int, capacity: int, folder: str = "/dev/shm") -> tuple[str, bytes, mmap.mmap]:
    """Rank 0: the group's new segment (`parallel.shm.create_file`): its path, token and mapping."""
    return create_file(segment_bytes(size, capacity), "shardlm-tp", folder)


def open_segment(path: str, token: bytes, size: int, capacity: int) -> mmap.mmap | None:
    """Another rank: the mapping of rank 0's segment, or None when this rank cannot see it (another
    host, another /dev/shm) or sees a different file."""
    return open_file(path, token, segment_bytes(size, capacity))
