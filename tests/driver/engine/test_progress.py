"""Start-up bars on their own: what they draw from the polls (the engine's own: test_cli_engine.py)."""

from __future__ import annotations

import contextlib
import io

from driver.engine.progress import StartBars, StartProgress
from workers.progress import RankProgress


def rank(r: int, loaded: int, step: str = "weights", done: bool = False) -> RankProgress:
    return RankProgress(rank=r, step=step, step_done=done, tensors_loaded=loaded, tensors_total=10, bytes_read=loaded * 2**20)


def test_a_rank_missing_from_the_last_poll_still_shows_complete() -> None:
    """A rank busy past the poll's deadline is left out of that answer: the bars keep its last
    one, and a finished weights bar shows every rank's tensors all loaded."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        bars = StartBars()
        bars.update(StartProgress(phase="weights", world_size=2, ranks=[rank(0, 4), rank(1, 3)]))
        bars.update(StartProgress(phase="profile", world_size=2, ranks=[rank(0, 10, "profile")]))  # rank 1 silent
        bars.close()
    final = [line for line in stderr.getvalue().replace("\r", "\n").splitlines() if line.startswith("Loading weights: 100%")]
    assert final and "20/20 tensors" in final[-1] and "rank 0 10/10, rank 1 10/10" in final[-1]
