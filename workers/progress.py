"""How far a rank's start-up has got, for the progress bars of the process that called `LLM(...)`.

The rank's own thread writes a `ProgressTracker` while it works (which start-up call it is in,
how many of its checkpoint tensors are loaded, the bytes read so far); a second thread of the
worker actor answers the driver's polls with a `RankProgress` snapshot of it. Plain attribute
writes and reads: the loading thread never waits for a poll.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec
from torch import nn

from parallel.weights import WeightSource
from workers.read_stats import ReadStats


class RankProgress(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one rank's start-up."""

    rank: int
    step: str = ""
    """The start-up call running, or the last one run: "weights", "profile", "kv_allocation"."""
    step_done: bool = False
    """Whether `step` has returned."""
    tensors_loaded: int = 0
    tensors_total: int = 0
    """Checkpoint tensors (fused shards counted apart) this rank's model loads from."""
    bytes_read: int = 0


@dataclass
class ProgressTracker:
    """Written by the rank while it starts; `snapshot()` may be called from another thread."""

    rank: int
    step_name: str = ""
    step_done: bool = False
    tensors_loaded: int = 0
    tensors_total: int = 0
    stats: ReadStats | None = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Mark the start-up call `name` as running, and as done if it returns."""
        self.step_name, self.step_done = name, False
        yield
        self.step_done = True

    def track(
        self, model: nn.Module, sources: Iterable[WeightSource], stats: ReadStats, total: int | None = None
    ) -> Iterator[WeightSource]:
        """`sources`, counting each one once the loader asks for the next (it is loaded by then);
        `total`: how many there are (default: the checkpoint tensors the model's parameters take)."""
        self.stats = stats
        self.tensors_total = (
            total if total is not None else sum(len(p.full_shapes) for p in dict(model.named_parameters()).values())
        )
        self.tensors_loaded = 0
        for source in sources:
            yield source
            self.tensors_loaded = min(self.tensors_loaded + 1, self.tensors_total)  # ignored tensors too

    def loaded(self) -> None:
        """The load finished: every tensor is in, whatever was counted on the way."""
        self.tensors_loaded = self.tensors_total

    def snapshot(self) -> RankProgress:
        return RankProgress(
            rank=self.rank,
            step=self.step_name,
            step_done=self.step_done,
            tensors_loaded=self.tensors_loaded,
            tensors_total=self.tensors_total,
            bytes_read=self.stats.bytes_read if self.stats is not None else 0,
        )
