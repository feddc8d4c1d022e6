"""Steps to the ranks through one shared-memory segment, where the driver actor and every rank
can map the same file (one host): the driver writes each step's message once, every rank reads
it, rank 0 writes the result back. A round trip costs tens of microseconds; a Ray Compiled
Graph's costs about 250 here, and its read loop keeps a core busy on every idle rank.

Layout (64-byte lines, so that no two processes write one cache line):

    [token][driver: sent, consumed, closed, pid][rank r: taken, done, failed, pid]
    [2 message slots][2 result slots][one error slot per rank]

Each slot starts with its payload's length (int64). Steps are numbered 1, 2, ...; step g uses
message slot and result slot g % 2.

- The driver writes step g's message, then raises `sent` to g. It writes there only once every
  rank has raised `taken` to g - 2 (has decoded the last message in that slot).
- Rank r decodes the message, raises `taken`, runs the step, and raises `done` to g. When the
  step raises, it first sets `failed` to g, with its error pickled in its error slot; `failed`
  keeps the first failed step, and the rank runs no later step (its state, and its place in the
  ranks' collectives, are lost), only marks each taken and done so that nobody waits for it.
- The driver's waits look at every rank's `failed`: a rank that failed is named at once, though
  the others may be blocked in a collective with it.
- Rank 0 writes step g's result before it raises `done`, once the driver has raised `consumed`
  to g - 2 (has read the last result in that slot).

So two steps can be in flight at once, which is what async scheduling needs. A payload larger
than its slot goes into a file of its own beside the segment (`Spills`), which its writer removes. Memory order is as `parallel.shm` describes (x86-64 only).

Every wait spins for `SPIN_S`, then sleeps on the futex of the flag it waits for, in slices of
`FUTEX_SLICE_S`, checking between slices that the processes it waits for still run: the driver
names a rank whose process ended; a rank's loop ends when the driver's has.

Waking a sleeper is what a round trip costs most: a futex wake that finds one took 18 - 23 us
of a rank's step here (one with none, about 1). Where the host has a core to spare beside the
ranks (`spin_ahead`), the driver waiting for a result sleeps only until shortly before it is
due (the last result's time plus the steps' recent period, less `SPIN_AHEAD_S`) and spins from
there, so that the rank's wake finds nobody asleep. Where it has none, the driver waiting for a
result does not spin at all: its spin would take a rank's core (a tiny Llama's batch-1 step at
tp=2 on this 2-core machine took 0.85 - 0.97 ms so, against 0.89 - 1.12 ms spinning SPIN_S).
"""

from __future__ import annotations

import mmap
import os
import pickle
import secrets
import time
import traceback
from collections.abc import Callable
from typing import Any

from parallel.errors import EngineDeadError, ShardLMError
from parallel.shm import Futex, alive, create_file, open_file

LINE = 64
MESSAGE_BYTES = 4 << 20
"""Capacity of one message slot (a step's `Batch`); larger messages go through a file of their own."""
RESULT_BYTES = 1 << 20
"""Capacity of one result slot (rank 0's `StepResult`)."""
SLOT_BYTES_ENV = "SHARDLM_STEP_CHANNEL_BYTES"
"""Bytes of every message and result slot, where set (tests make payloads spill with a small one)."""
ERROR_BYTES = 64 << 10
SPIN_S = 50e-6
SPIN_AHEAD_S = 150e-6
"""With `spin_ahead`: how long before a result is due the driver stops sleeping, and (three
times it) how long it then spins before it sleeps on the flag again."""
FUTEX_SLICE_S = 0.1
DRIVER = ("sent", "consumed", "closed", "pid")
RANK = ("taken", "done", "failed", "pid")


class Layout:
    """Where everything is in a segment for `size` ranks."""

    def __init__(self, size: int, message_bytes: int = MESSAGE_BYTES, result_bytes: int = RESULT_BYTES) -> None:
        self.size, self.message_bytes, self.result_bytes = size, message_bytes, result_bytes
        self.messages = LINE * (2 + size)
        self.results = self.messages + 2 * message_bytes
        self.errors = self.results + 2 * result_bytes
        self.nbytes = self.errors + size * ERROR_BYTES

    @classmethod
    def from_env(cls, size: int) -> Layout:
        value = os.environ.get(SLOT_BYTES_ENV, "").strip()
        if not value:
            return cls(size)
        slot = max(64, -(-int(value) // 8) * 8)
        return cls(size, slot, slot)

    def flag(self, owner: int | None, name: str) -> int:
        """The byte offset of a flag: the driver's (`owner` None) or rank `owner`'s."""
        if owner is None:
            return LINE + 8 * DRIVER.index(name)
        return LINE * (2 + owner) + 8 * RANK.index(name)

    def message(self, step: int) -> tuple[int, int]:
        return self.messages + (step % 2) * self.message_bytes, self.message_bytes

    def result(self, step: int) -> tuple[int, int]:
        return self.results + (step % 2) * self.result_bytes, self.result_bytes

    def error(self, rank: int) -> tuple[int, int]:
        return self.errors + rank * ERROR_BYTES, ERROR_BYTES

    def as_tuple(self) -> tuple[int, int, int]:
        return self.size, self.message_bytes, self.result_bytes


class _Segment:
    """A mapping of the segment and the flags in it."""

    def __init__(self, buffer: mmap.mmap, layout: Layout) -> None:
        import ctypes

        self.buffer, self.layout = buffer, layout
        self.words = memoryview(buffer).cast("q")
        self._anchor = ctypes.c_char.from_buffer(buffer)
        self.base = ctypes.addressof(self._anchor)
        self.futex = Futex()

    def get(self, owner: int | None, name: str) -> int:
        return self.words[self.layout.flag(owner, name) // 8]

    def set(self, owner: int | None, name: str, value: int) -> None:
        offset = self.layout.flag(owner, name)
        self.words[offset // 8] = value
        self.futex.wake(self.base + offset)

    def sleep(self, owner: int | None, name: str, seen: int, timeout_s: float) -> None:
        """Sleep until the flag changes from `seen` (or a wake-up, or `timeout_s`)."""
        self.futex.wait(self.base + self.layout.flag(owner, name), seen, timeout_s)

    def write(self, where: tuple[int, int], payload: bytes, spill: Callable[[bytes], bytes]) -> None:
        """`payload` into a slot: itself when it fits, else the reference `spill` makes of it."""
        offset, capacity = where
        length = len(payload)
        if length > capacity - 8:
            payload = spill(payload)
            length = -len(payload)
        self.words[offset // 8] = length
        self.buffer[offset + 8 : offset + 8 + len(payload)] = payload

    def read(self, where: tuple[int, int]) -> memoryview | bytes:
        """A slot's payload: a view of the slot (copy it, or decode it, before the slot is reused),
        or the bytes of the file it was spilled to."""
        offset, _ = where
        length = self.words[offset // 8]
        if length < 0:
            return Spills.read(bytes(self.buffer[offset + 8 : offset + 8 - length]))
        return memoryview(self.buffer)[offset + 8 : offset + 8 + length]

    def close(self) -> None:
        self.words.release()
        del self._anchor
        try:
            self.buffer.close()
        except BufferError:  # a view of a payload is still held somewhere: the mapping ends with the process
            pass


class Spills:
    """Payloads too large for their slot, each in a file of its own beside the segment (every
    process that maps the segment can open it): the slot holds the file's path, with its length
    negated. The writer removes a file when it reuses the slot (every reader has read it by then)
    and at `close`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.held: list[str | None] = [None, None]

    def spill(self, step: int) -> Callable[[bytes], bytes]:
        def write(payload: bytes) -> bytes:
            self._remove(step % 2)
            path = os.path.join(self.folder, f"shardlm-spill-{os.getpid()}-{secrets.token_hex(8)}")
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(payload)
            self.held[step % 2] = path
            return path.encode()

        return write

    @staticmethod
    def read(reference: bytes) -> bytes:
        with open(reference.decode(), "rb") as f:
            return f.read()

    def _remove(self, slot: int) -> None:
        path, self.held[slot] = self.held[slot], None
        if path is not None and os.path.exists(path):
            os.unlink(path)

    def close(self) -> None:
        self._remove(0)
        self._remove(1)


class StepChannel:
    """The driver's end: `send` a step's message to every rank, `result` waits for it."""

    def __init__(
        self,
        size: int,
        timeout_s: float,
        check: Callable[[], None] | None = None,
        layout: Layout | None = None,
        spin_ahead: bool | None = None,
    ) -> None:
        """`check`: called between sleeps while the driver waits; it raises when a rank is known
        to have gone (its actor died) in a way its pid may not show. `spin_ahead` (None: where
        this host has more cores than ranks): wake up for a result before it is due."""
        self.layout = layout or Layout.from_env(size)
        self.check = check
        self.path, self.token, buffer = create_file(self.layout.nbytes, "shardlm-steps")
        self.segment = _Segment(buffer, self.layout)
        self.segment.set(None, "pid", os.getpid())
        self.timeout_s = timeout_s
        self.sent = 0
        self.answered = 0
        """The last step whose result has been taken (or has raised)."""
        self.spills = Spills(os.path.dirname(self.path))
        self.spin_ahead = len(os.sched_getaffinity(0)) > size if spin_ahead is None else spin_ahead
        self.period_s = 0.0
        """The recent time between one result and the next (0: none seen yet)."""
        self.last_result_s = 0.0
        self.awake_results = 0
        """Results found while the driver spun (not woken by the rank): the round trips `spin_ahead` saved."""

    def offer(self) -> tuple[str, bytes, tuple[int, int, int]]:
        """What a rank needs to attach: (path, token, layout)."""
        return self.path, self.token, self.layout.as_tuple()

    def attached(self) -> None:
        """Every rank has mapped the segment: its file can go (the mappings keep it)."""
        os.unlink(self.path)

    def send(self, message: bytes) -> int:
        """Write a step's message for every rank; its number, for `result`."""
        step = self.sent + 1
        self._wait_ranks("taken", step - 2, "take the message before the one before")
        self.segment.write(self.layout.message(step), message, self.spills.spill(step))
        self.segment.set(None, "sent", step)
        self.sent = step
        return step

    def result(self, step: int, decode: Callable[[memoryview | bytes], Any], timeout_s: float | None = None) -> Any:
        """Rank 0's result of `step`, decoded, once every rank has run it; an error naming the
        rank when one failed or ended."""
        spin_s = SPIN_S if self.spin_ahead else 0.0  # no core to spare: a spin takes a rank's
        if self.spin_ahead and self.period_s:
            self._doze(self.last_result_s + self.period_s - SPIN_AHEAD_S, step)
            spin_s = 3 * SPIN_AHEAD_S
        self.awake_results += self._wait_ranks("done", step, "run it", timeout_s, spin_s)
        self._timed_result()
        self.answered = max(self.answered, step)
        failed = self._first_failed(step)
        if failed is not None:
            raise self._failure(failed)
        decoded = decode(self.segment.read(self.layout.result(step)))
        self.segment.set(None, "consumed", step)
        return decoded

    @property
    def unanswered(self) -> int:
        """Steps sent whose results have not been taken."""
        return self.sent - self.answered

    def close(self) -> None:
        """Tell every rank's loop to end (they return from `StepReader.serve`), and unmap."""
        self.segment.set(None, "closed", 1)
        self.segment.set(None, "sent", self.sent)  # wakes the ranks sleeping on it
        self.segment.close()
        self.spills.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _doze(self, until_s: float, step: int) -> None:
        """Sleep on rank 0's `done` until `until_s` (perf_counter), or until it reaches `step`."""
        seen = self.segment.get(0, "done")
        left = until_s - time.perf_counter()
        if seen < step and 0 < left < FUTEX_SLICE_S:
            self.segment.sleep(0, "done", seen, left)

    def _timed_result(self) -> None:
        """Fold the time since the last result into the period. A gap of more than ten periods
        (an idle engine, or steps of another pace) makes it unknown, and the next gap measures it."""
        now = time.perf_counter()
        first, gap, self.last_result_s = not self.last_result_s, now - self.last_result_s, now
        if first:
            return
        if self.period_s and gap <= 10 * self.period_s:
            self.period_s += 0.25 * (gap - self.period_s)
        else:
            self.period_s = 0.0 if self.period_s else gap

    def _wait_ranks(self, flag: str, step: int, why: str, timeout_s: float | None = None, spin_s: float = SPIN_S) -> bool:
        """Until every rank's `flag` is at least `step`, or one has failed at it; whether it
        got there without sleeping."""
        if step <= 0:
            return True
        segment, size = self.segment, self.layout.size
        deadline_s = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        awake = True
        for rank in range(size):
            while (seen := segment.get(rank, flag)) < step:
                if self._first_failed(step) is not None:
                    return awake
                waited = time.perf_counter() - start
                if waited < spin_s:
                    continue
                if waited > deadline_s:
                    late = [r for r in range(size) if segment.get(r, flag) < step]
                    raise EngineDeadError(
                        f"execute_model did not finish within {deadline_s:.0f} s on rank(s) {late} "
                        f"(step {step}: waiting for them to {why})"
                    )
                if waited > FUTEX_SLICE_S:
                    self._check_ranks_alive(step)
                    if self.check is not None:
                        self.check()
                awake = False
                segment.sleep(rank, flag, seen, min(FUTEX_SLICE_S, deadline_s - waited + 1e-3))
        return awake

    def _first_failed(self, step: int) -> int | None:
        """The rank that failed first at or before `step` (None: none did)."""
        failures = [(f, r) for r in range(self.layout.size) if 0 < (f := self.segment.get(r, "failed")) <= step]
        return min(failures)[1] if failures else None

    def _check_ranks_alive(self, step: int) -> None:
        for rank in range(self.layout.size):
            pid = self.segment.get(rank, "pid")
            if pid and not alive(pid):
                raise EngineDeadError(f"rank {rank} died during execute_model (its process, pid {pid}, ended at step {step})")

    def _failure(self, rank: int) -> ShardLMError:
        """The error a rank wrote, naming it; a rank that ended is named first (a survivor's
        collective with it fails too)."""
        self._check_ranks_alive(self.segment.get(rank, "failed"))
        try:
            cause, text = pickle.loads(bytes(self.segment.read(self.layout.error(rank))))
        except Exception as exc:  # noqa: BLE001  an exception pickled but not unpicklable here
            cause, text = None, f"(its error could not be read back: {type(exc).__name__}: {exc})"
        return rank_step_error(rank, cause, text)


def _no_spill(payload: bytes) -> bytes:
    raise AssertionError(f"an error of {len(payload)} bytes was not cut to fit its slot")


def rank_step_error(rank: int, cause: BaseException | None, text: str) -> ShardLMError:
    """A failed step's error, naming the rank: a shardlm error keeps its type."""
    from parallel.shm_allreduce import PeerExited

    if isinstance(cause, ShardLMError) and not isinstance(cause, PeerExited):
        return type(cause)(f"rank {rank} (execute_model): {cause}")
    kind = type(cause).__name__ if cause is not None else "error"
    return EngineDeadError(f"rank {rank} failed in execute_model: {kind}: {cause}\n{text}")


class StepReader:
    """A rank's end: `serve` runs every step the driver sends until it closes the channel."""

    def __init__(self, rank: int, buffer: mmap.mmap, layout: Layout, folder: str = "/dev/shm") -> None:
        self.rank, self.layout = rank, layout
        self.segment = _Segment(buffer, layout)
        self.segment.set(rank, "pid", os.getpid())
        self.spills = Spills(folder)

    @classmethod
    def attach(cls, rank: int, offer: tuple[str, bytes, tuple[int, int, int]]) -> StepReader | None:
        """This rank's end of the driver's channel, or None when it cannot map the segment
        (another host) or cannot see the driver's process (another pid namespace)."""
        path, token, shape = offer
        layout = Layout(*shape)
        buffer = open_file(path, token, layout.nbytes)
        if buffer is None:
            return None
        reader = cls(rank, buffer, layout, os.path.dirname(path))
        if not alive(reader.segment.get(None, "pid")):
            reader.close()
            return None
        return reader

    def serve(self, decode: Callable[[memoryview | bytes], Any], run: Callable[[Any], bytes | None]) -> int:
        """Each step's message through `decode`, then `run` (rank 0 writes what it returns as the
        step's result), until the driver closes the channel or its process ends; the steps run."""
        step = 0
        while self._wait_driver("sent", step + 1):
            step += 1
            if self.segment.get(self.rank, "failed"):  # failed before: run nothing more
                self.segment.set(self.rank, "taken", step)
                self.segment.set(self.rank, "done", step)
                continue
            try:
                message = decode(self.segment.read(self.layout.message(step)))
                self.segment.set(self.rank, "taken", step)
                result = run(message)
            except Exception as exc:  # noqa: BLE001  sent to the driver, which names this rank
                self._fail(step, exc)
                continue
            if self.rank == 0 and result is not None:
                self._wait_driver("consumed", step - 2)  # the driver has read the result in this slot
                self.segment.write(self.layout.result(step), result, self.spills.spill(step))
            self.segment.set(self.rank, "done", step)
        return step

    def _wait_driver(self, flag: str, step: int) -> bool:
        """Wait until the driver's `flag` is at least `step` (True), or the channel is closed or
        the driver's process has ended (False)."""
        segment = self.segment
        start = time.perf_counter()
        while (seen := segment.get(None, flag)) < step:
            if segment.get(None, "closed"):
                return False
            waited = time.perf_counter() - start
            if waited < SPIN_S:
                continue
            if waited > FUTEX_SLICE_S and not alive(segment.get(None, "pid")):
                return False
            segment.sleep(None, flag, seen, FUTEX_SLICE_S)
        return True

    def _fail(self, step: int, exc: Exception) -> None:
        text = "".join(traceback.format_exception(exc))
        try:
            payload = pickle.dumps((exc, text))
        except Exception:  # noqa: BLE001  an exception that cannot be pickled: its text
            payload = pickle.dumps((None, f"{type(exc).__name__}: {exc}\n{text}"))
        where = self.layout.error(self.rank)
        if len(payload) > where[1] - 8:  # the error slot never spills: its text's tail fits
            tail = text.encode()[-(where[1] // 2) :].decode(errors="replace")
            payload = pickle.dumps((None, tail))
        self.segment.write(where, payload, spill=_no_spill)
        self.segment.set(self.rank, "taken", step)
        self.segment.set(self.rank, "failed", step)
        self.segment.set(self.rank, "done", step)

    def close(self) -> None:
        self.segment.close()
        self.spills.close()
