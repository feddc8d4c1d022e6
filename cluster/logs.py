"""shardlm's logging: every module logs to `shardlm.<module>`, under one `shardlm` logger.

The `shardlm` command sends that logger to stderr at the level it was asked for and passes the
level on to the engine's actors (SHARDLM_LOG_LEVEL travels in their runtime environment), where
`configure_actor_logging` does the same; Ray forwards an actor's stderr to the driver under the
actor's prefix, `(shardlm-engine pid=...)` or `(shardlm-rank1 pid=...)`.

Ray's and Ray Serve's own records stay at WARNING and above (INFO too when shardlm logs at DEBUG:
`ray_level`), and the prefixes Ray puts before its actors' lines carry no colour codes unless
both stdout and stderr are terminals (`log_to_stderr` sets RAY_COLOR_PREFIX=0 otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

ROOT = "shardlm"
LEVEL_ENV = "SHARDLM_LOG_LEVEL"
COLOR_ENV = "RAY_COLOR_PREFIX"
"""Read by Ray's driver each time it prints an actor's line: "0", no colour codes."""
RAY_LOGGERS = ("ray", "ray.serve")
"""Ray's loggers in the driver (ray.init sets the first, importing Ray Serve the second at INFO)."""
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
    saved = (logger.level, logger.propagate)
    saved_ray = {name: logging.getLogger(name).level for name in RAY_LOGGERS}
    saved_env = {name: os.environ.get(name) for name in (LEVEL_ENV, COLOR_ENV)}
    handler = _install(level)
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    if not _terminals():
        os.environ.setdefault(COLOR_ENV, "0")
    quiet_ray_loggers()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for name, ray_logger_level in saved_ray.items():
            logging.getLogger(name).setLevel(ray_logger_level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _terminals() -> bool:
    """Whether stdout and stderr are both terminals (Ray prints actors' lines to either)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def ray_level() -> int:
    """The level of Ray's and Ray Serve's own records: WARNING, or INFO when shardlm logs at DEBUG."""
    return logging.INFO if logging.getLogger(ROOT).getEffectiveLevel() <= logging.DEBUG else logging.WARNING


def quiet_ray_loggers() -> None:
    """Set Ray's loggers in this process to `ray_level` (again after ray.init or importing Ray
    Serve, which set their own)."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(ray_level())


def configure_actor_logging() -> None:
    """In an engine or worker actor: shardlm's records at SHARDLM_LOG_LEVEL (default WARNING) to
    stderr, once per process."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        _install(os.environ.get(LEVEL_ENV, "WARNING"))
