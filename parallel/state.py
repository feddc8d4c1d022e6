"""Tensor-parallel group state and the named collectives the parallel layers use.

Nothing outside `parallel/` calls `torch.distributed`: layers receive a `TensorParallelGroup`
and call its methods. A group of size 1 needs no process group and every collective is the
identity, so a single rank runs in-process with no `torch.distributed` set-up at all.

CPU ranks that all share one host also get a shared-memory communicator (`parallel.shm_allreduce`):
all-reduces and gathers of tensors that fit its slots go through it, in microseconds where gloo
takes hundreds; larger tensors, and groups across hosts, use the process group.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel import shm_allreduce
from parallel.shm_allreduce import ShmCommunicator

logger = logging.getLogger(f"shardlm.{__name__}")


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's place in its tensor-parallel group."""

    rank: int
    """This rank's index, 0 <= rank < size."""
    size: int
    """Number of ranks that split every parallel layer."""
    group: dist.ProcessGroup | None = None
    """The torch process group. Without one, a group of size > 1 can build and load its layers
    (loading never communicates) but not run them."""
    shm: ShmCommunicator | None = None
    """The ranks' shared segment, where all of them are CPU ranks on one host: small collectives go
    through it instead of `group`."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    def _require_group(self) -> None:
        if self.group is None:
            raise RuntimeError(f"rank {self.rank} of {self.size} has no process group to communicate through")

    @classmethod
    def single(cls) -> TensorParallelGroup:
        """The trivial group: one rank, no communication."""
        return cls(rank=0, size=1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; every rank gets the sum."""
        if self.size == 1:
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        self._require_group()
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along its last dimension on rank 0; None elsewhere."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self.shm is not None and self.shm.fits(x):
            return self.shm.gather_last_dim(x)
        self._require_group()
        pieces = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, pieces, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat(pieces, dim=-1) if pieces is not None else None

    def rows_to_columns(self, block: torch.Tensor, total_rows: int) -> torch.Tensor:
        """Turn row blocks into column slices: the exchange behind row-parallel loading.

        Every rank holds rows `split_evenly(total_rows)[rank]` of a matrix W with all its columns;
        it returns all rows of its columns `split_evenly(W.shape[1])[rank]`, having sent each
        other rank that rank's columns of its rows (one all-to-all). Reading whole rows keeps the
        file pages a rank touches near 1/p, which reading a column slice directly does not.
        """
        if self.size == 1:
            return block
        self._require_group()
        rows = [stop - start for start, stop in split_evenly(total_rows, self.size)]
        cols = [stop - start for start, stop in split_evenly(block.shape[1], self.size)]
        send = torch.cat([piece.reshape(-1) for piece in block.split(cols, dim=1)])
        mine = cols[self.rank]
        received = torch.empty(total_rows * mine, dtype=block.dtype, device=block.device)
        dist.all_to_all_single(received, send, [r * mine for r in rows], [block.shape[0] * c for c in cols], group=self.group)
        return received.view(total_rows, mine)

    def barrier(self) -> None:
        if self.size > 1:
            self._require_group()
            dist.barrier(group=self.group)


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `parts` contiguous pieces of `total`, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def init_tensor_parallel(
    rank: int, world_size: int, address: str, port: int, backend: str, timeout_s: float
) -> TensorParallelGroup:
    """Join the process group that spans the tensor-parallel ranks (NCCL on CUDA, gloo on CPU).

    Every collective on it fails after `timeout_s` rather than waiting forever for a lost rank.
    On CPU, ranks that share a host also share memory for small collectives (`parallel.shm_allreduce`;
    `SHARDLM_SHM_ALLREDUCE_BYTES=0` turns it off).
    """
    if world_size == 1:
        return TensorParallelGroup.single()
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    group = dist.group.WORLD
    shm = shm_allreduce.join(group, rank, world_size, timeout_s) if backend == "gloo" else None
    logger.debug("rank %d: collectives through %s", rank, "shared memory and gloo" if shm is not None else backend)
    return TensorParallelGroup(rank=rank, size=world_size, group=group, shm=shm)


def destroy_tensor_parallel(tp: TensorParallelGroup | None = None) -> None:
    """Leave the process group, if this process joined one, and unmap `tp`'s shared segment."""
    if tp is not None and tp.shm is not None:
        tp.shm.close()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
