"""shardlm's logging: every module logs to `shardlm.<module>`, under one `shardlm` logger.

The `shardlm` command sends that logger to stderr at the level it was asked for and passes the
level on to the engine's actors (SHARDLM_LOG_LEVEL travels in their runtime environment), where
`configure_actor_logging` does the same; Ray forwards an actor's stderr to the driver under the
actor's prefix, `(shardlm-engine pid=...)` or `(shardlm-rank1 pid=...)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

ROOT = "shardlm"
LEVEL_ENV = "SHARDLM_LOG_LEVEL"
FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (pytest and tqdm replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _install(level: int | str) -> logging.Handler:
    logger = logging.getLogger(ROOT)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


@contextlib.contextmanager
def log_to_stderr(level: int) -> Iterator[None]:
    """While inside: shardlm's records at `level` and above go to stderr, in this process and in
    the actors of any engine started meanwhile; afterwards, logging is as it was."""
    logger = logging.getLogger(ROOT)
    saved = (logger.level, logger.propagate, os.environ.get(LEVEL_ENV))
    handler = _install(level)
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if saved[2] is None:
            os.environ.pop(LEVEL_ENV, None)
        else:
            os.environ[LEVEL_ENV] = saved[2]


def configure_actor_logging() -> None:
    """In an engine or worker actor: shardlm's records at SHARDLM_LOG_LEVEL (default WARNING) to
    stderr, once per process."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        _install(os.environ.get(LEVEL_ENV, "WARNING"))
