"""Progress bars on stderr, drawn by the process that called `LLM(...)`: one per phase of an engine
start, and one over offline generation.

During a start the LLM polls the driver actor (`Engine.progress`), which polls every rank
(`WorkerActor.progress`); both answer on a second thread of their actor, so the polls never wait
for a load and a load never waits for a poll. Each answer is a `StartProgress`, and `StartBars`
turns the sequence of answers into bars. Nothing is printed from inside the actors.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import msgspec

from workers.progress import RankProgress

PHASES = ("placement", "workers", "weights", "profile", "kv_allocation", "tokenizer", "warmup", "ready")
"""The engine's start-up phases, in order (`Engine.phase`)."""
BARS = {"weights": "Loading weights", "profile": "Profiling memory", "kv_allocation": "Allocating KV cache"}
"""The phases that get a bar, and its description."""
WEIGHTS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tensors [{elapsed}<{remaining}{postfix}]"
RANKS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} ranks [{elapsed}]"
POLL_S = 0.2
"""How often the LLM asks the driver actor where the start has got."""
MIB = 2**20


class StartProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Where an engine start has got: the driver actor's phase and what each rank answered."""

    phase: str
    world_size: int
    ranks: list[RankProgress] = []
    """The ranks that answered the poll in time, in rank order."""


def bars_enabled(wanted: bool | None = True) -> bool:
    """`wanted`, unless TQDM_DISABLE is set (the test suite sets it; tqdm reads it only at import)."""
    return bool(wanted) and os.environ.get("TQDM_DISABLE", "").strip().lower() in ("", "0", "false", "no")


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr; where stderr is not a terminal (a log file, `ray job logs`) it is
    redrawn every few seconds rather than ten times a second."""
    from tqdm.auto import tqdm

    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    kwargs.setdefault("disable", False)  # not tqdm's default, which TQDM_DISABLE fixed when tqdm was imported
    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if interactive else 5.0, **kwargs)


def _after(phase: str, other: str) -> bool:
    """Whether the start is past `other` when it is in `phase` (an unknown phase is before all)."""
    rank = {name: i for i, name in enumerate(PHASES)}
    return rank.get(phase, -1) > rank[other]


class StartBars:
    """The bars of one engine start; `update` with each `StartProgress`, `close` at the end."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}
        self.finished: set[str] = set()
        self.ranks: dict[int, RankProgress] = {}
        """Each rank's latest answer: a poll that a busy rank did not answer in time keeps it."""

    def update(self, progress: StartProgress) -> None:
        """Draw the bar of the phase running; finish those of the phases passed (a phase over
        between two polls still gets its bar, drawn full)."""
        self.ranks.update({r.rank: r for r in progress.ranks})
        progress = msgspec.structs.replace(progress, ranks=[self.ranks[r] for r in sorted(self.ranks)])
        for phase in BARS:
            if phase not in self.finished and (progress.phase == phase or _after(progress.phase, phase)):
                self._draw(phase, progress, finished=progress.phase != phase)

    def close(self) -> None:
        """End every bar still open (a start that failed leaves its bars where they stood)."""
        for phase, bar in self.bars.items():
            if phase not in self.finished:
                bar.close()

    def _draw(self, phase: str, progress: StartProgress, finished: bool) -> None:
        done, total = _weights(progress) if phase == "weights" else _ranks_done(phase, progress)
        if phase not in self.bars:
            if total is None:
                return  # not every rank knows its count yet
            form = WEIGHTS_FORMAT if phase == "weights" else RANKS_FORMAT
            self.bars[phase] = progress_bar(desc=BARS[phase], total=total, bar_format=form)
        bar = self.bars[phase]
        if phase == "weights":
            if finished:  # every rank has loaded all its tensors, whatever its last answer said
                ranks = [msgspec.structs.replace(r, tensors_loaded=r.tensors_total) for r in progress.ranks]
                progress = msgspec.structs.replace(progress, ranks=ranks)
            bar.set_postfix_str(_weights_postfix(progress), refresh=False)
        if finished:
            done = bar.total
        bar.update(max(0, done - bar.n))
        if finished:
            self.finished.add(phase)
            bar.close()


def _weights(progress: StartProgress) -> tuple[int, int | None]:
    """(tensors loaded over all ranks, tensors to load over all ranks once every rank has said)."""
    ranks = [r for r in progress.ranks if r.tensors_total]
    total = sum(r.tensors_total for r in ranks) if len(ranks) == progress.world_size else None
    return sum(r.tensors_loaded for r in ranks), total


def _weights_postfix(progress: StartProgress) -> str:
    read = sum(r.bytes_read for r in progress.ranks) / MIB
    per_rank = [f"rank {r.rank} {r.tensors_loaded}/{r.tensors_total}" for r in progress.ranks if r.tensors_total]
    shown = ", ".join(per_rank) + ", " if 1 < progress.world_size <= 4 else ""
    return f"{shown}{read:.1f} MiB read"


def _ranks_done(phase: str, progress: StartProgress) -> tuple[int, int]:
    """(ranks that have finished `phase`, all ranks)."""
    done = sum(1 for r in progress.ranks if (r.step == phase and r.step_done) or _after(r.step, phase))
    return done, progress.world_size
