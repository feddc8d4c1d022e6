"""Shared-memory files and futexes: what `parallel.shm_allreduce` (the ranks' collectives) and
`cluster.step_channel` (the driver's steps to the ranks) are built from.

A segment is a file in /dev/shm whose first bytes hold a random token: a process that maps it
checks the token, so that it never takes another engine's file (or a file of the same name on
another host) for its own. Its blocks are reserved when it is made, so a full tmpfs fails there
and not later with SIGBUS.

The flags the processes raise in a segment are int64 words written and read in program order.
x86-64 keeps stores (and loads) in order, so a process that sees a flag sees the data written
before it; elsewhere this is not promised without fences that Python cannot issue, so
`supported()` is False there and callers take another path.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets

TOKEN_BYTES = 16


def supported() -> bool:
    """Whether this machine keeps stores in order (x86-64), which the flags rely on."""
    return platform.machine().lower() in ("x86_64", "amd64")


class Futex:
    """Sleeping on, and waking, 32-bit words of a shared mapping (Linux futexes, not private: they
    work across processes that map one file). An int64 flag's futex word is its low half, at the
    flag's own address (x86-64 is little-endian)."""

    SYS_FUTEX = 202  # x86-64
    WAIT, WAKE = 0, 1

    def __init__(self) -> None:
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long

    def wait(self, address: int, expected: int, timeout_s: float) -> None:
        """Sleep while the word at `address` is `expected` (mod 2**32), at most `timeout_s`; a
        wake-up, a changed word, a signal or the timeout all return."""
        seconds = int(timeout_s)
        timeout = _Timespec(seconds, int((timeout_s - seconds) * 1e9))
        self._syscall(
            ctypes.c_long(self.SYS_FUTEX),
            ctypes.c_void_p(address),
            ctypes.c_int(self.WAIT),
            ctypes.c_uint32(expected & 0xFFFFFFFF),
            ctypes.byref(timeout),
            None,
            ctypes.c_int(0),
        )

    def wake(self, address: int) -> None:
        """Wake every process sleeping on the word at `address`."""
        self._syscall(
            ctypes.c_long(self.SYS_FUTEX),
            ctypes.c_void_p(address),
            ctypes.c_int(self.WAKE),
            ctypes.c_int(0x7FFFFFFF),
            None,
            None,
            ctypes.c_int(0),
        )


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def alive(pid: int) -> bool:
    """Whether a process of this pid runs (in this pid namespace); one that has ended but whose
    parent has not reaped it yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid: it runs
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def create_file(nbytes: int, prefix: str, folder: str = "/dev/shm") -> tuple[str, bytes, mmap.mmap]:
    """A new file of `nbytes` in `folder`, its blocks reserved up front, a random token in its
    first bytes: its path, the token and a mapping of it."""
    token = secrets.token_bytes(TOKEN_BYTES)
    path = os.path.join(folder, f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        buffer = mmap.mmap(fd, nbytes)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    buffer[: len(token)] = token
    return path, token, buffer


def open_file(path: str, token: bytes, nbytes: int) -> mmap.mmap | None:
    """The mapping of a file `create_file` made, or None when this process cannot see it
    (another host, another /dev/shm) or sees a different file (another size, another token)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != nbytes:
            return None
        buffer = mmap.mmap(fd, nbytes)
    except OSError:
        return None
    finally:
        os.close(fd)
    if buffer[: len(token)] != token:
        buffer.close()
        return None
    return buffer
