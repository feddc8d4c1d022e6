"""Tensor-parallel group state and the named collectives the parallel layers use.

Nothing outside `parallel/` calls `torch.distributed`: layers receive a `TensorParallelGroup`
and call its methods. A group of size 1 needs no process group and every collective is the
identity, so a single rank runs in-process with no `torch.distributed` set-up at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    def _require_group(self) -> None:
        if self.group is None:
            raise RuntimeError(f"rank {self.rank} of {self.size} has no process group to communicate through")

    @classmethod
    def single(cls) -> "TensorParallelGroup":
        """The trivial group: one rank, no communication."""
        return cls(rank=0, size=1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; every rank gets the sum."""
        if self.size > 1:
            self._require_group()
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along its last dimension on rank 0; None elsewhere."""
        if self.size == 1:
            return x
        self._require_group()
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, pieces, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat(pieces, dim=-1) if pieces is not None else None
