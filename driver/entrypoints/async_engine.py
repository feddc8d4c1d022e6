"""`AsyncEngine`: the engine, in this process, for many concurrent callers on an asyncio loop.

The `Engine` is stepped by one thread, which owns it: between two steps it runs what the callers
asked for (queue requests, abort them, render a chat), in the order they asked. Each submission
gets a `RequestStream`, fed from that thread with each request's latest `RequestOutput`. Nothing
here blocks the event loop: a caller only awaits futures that the engine thread completes.

`StartingEngine` starts one on a thread of its own, so that its owner (a Serve replica) can
answer while the ranks load: where the start has got, and the engine, or why it failed, after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

import ray

from cluster.connect import forwarded_env
from driver.config.args import EngineArgs
from driver.engine.actor import Engine
from driver.engine.outputs import RequestOutput
from driver.engine.progress import StartProgress
from driver.engine.report import LoadReport
from parallel.errors import EngineDeadError
from workers.sampling_params import SamplingParams

logger = logging.getLogger(f"shardlm.{__name__}")

Prompt = tuple[str | None, list[int] | None]
"""(text, token ids), one of the two None."""


class _Stop:
    """Tells the engine thread to end."""


class AsyncEngine:
    """Owns an `Engine` and the one thread that steps it."""

    def __init__(self, engine: Engine, load_report: LoadReport | None = None) -> None:
        self.engine = engine
        self.config = engine.config
        self.load_report = load_report
        """What each start-up phase and rank cost (None for an engine started elsewhere)."""
        self.dead: EngineDeadError | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # put() is safe from __del__
        self._sinks: dict[str, _Sink] = {}  # request id -> where its outputs go; engine thread only
        self._ids = itertools.count()
        self._blocked_logged: str | None = None
        self._prefix = uuid.uuid4().hex[:8]
        self._thread = threading.Thread(target=self._run, name="shardlm-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, args: EngineArgs, placement_strategy: str = "PACK", placement_timeout_s: float = 60.0) -> AsyncEngine:
        """Start an engine in this process (the Ray driver, or a Serve replica, whose placement
        group then holds the ranks) and its stepping thread."""
        engine = build_engine(args, placement_strategy)
        return cls(engine, engine.start(placement_timeout_s))

    # -- what callers await ---------------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` run by the engine thread between two steps; its result or its exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, args, future))
        return await asyncio.wrap_future(future)

    async def submit(
        self, prompts: list[Prompt], params: SamplingParams, request_id: str | None = None, length_field: str | None = None
    ) -> RequestStream:
        """Queue one request per prompt, `<request_id>-<i>`; all or none (a ValueError names the
        bad prompt). `request_id` must be unique (default: one made here). `length_field`: refuse a
        prompt whose max_tokens would run past max_model_len, naming the prompt as this field."""
        if self.dead is not None:
            raise EngineDeadError(str(self.dead))
        base = request_id or f"{self._prefix}-{next(self._ids)}"
        request_ids = [f"{base}-{i}" for i in range(len(prompts))]
        requests = [(rid, text, ids, params) for rid, (text, ids) in zip(request_ids, prompts)]
        stream = RequestStream(self, request_ids)
        sink = _Sink(asyncio.get_running_loop(), stream.queue)
        try:
            await self.call(self._add, requests, sink, length_field)
        except asyncio.CancelledError:
            stream.close()  # the add may have run all the same: take back what it queued
            raise
        except BaseException:
            stream.forget()  # nothing was queued
            raise
        return stream

    async def render_chat(
        self, conversations: list[list[dict]], add_generation_prompt: bool = True, kwargs: dict | None = None
    ) -> list[list[int]]:
        """Each conversation through the tokenizer's chat template, as token ids."""
        return await self.call(self.engine.render_chat, conversations, None, add_generation_prompt, kwargs or {})

    async def stats(self) -> dict[str, int]:
        return await self.call(self.engine.stats)

    def abort(self, request_ids: list[str]) -> None:
        """Abort these requests at the next step boundary (without waiting); unknown ids are ignored."""
        self._inbox.put((self._abort, (request_ids,), None))

    def check_health(self) -> None:
        """Raise the engine's EngineDeadError once it has died."""
        if self.dead is not None:
            raise EngineDeadError(str(self.dead))
        if not self._thread.is_alive():
            raise EngineDeadError("the engine's stepping thread has stopped")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Fail what is in flight, stop the thread, free the workers and the placement; safe twice."""
        if self._thread.is_alive():
            self._inbox.put((_Stop, (), None))
            self._thread.join(timeout_s)
        self.engine.shutdown()

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = self.dead is not None or not self.engine.has_unfinished() or self._blocked()
            try:
                command = self._inbox.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] is _Stop:
                    self._fail_all(EngineDeadError("the server is shutting down"))
                    return
                self._do(*command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self.dead is None and self.engine.has_unfinished():
                self._step()

    def _blocked(self) -> bool:
        """Whether the last step found nothing it could schedule: then the thread waits for the
        next command (a request, an abort) instead of stepping again, and says once why."""
        blocked = getattr(self.engine, "blocked", None)
        if blocked != self._blocked_logged:
            self._blocked_logged = blocked
            if blocked is not None:
                logger.warning("the engine waits for a request or an abort: %s", blocked)
        return blocked is not None

    def _do(self, fn: Callable[..., Any], args: tuple, future: concurrent.futures.Future | None) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
            return  # the caller gave up before it ran
        try:
            result = fn(*args)
        except BaseException as exc:  # the caller gets it
            if future is None:
                logger.warning("engine command %s failed: %s", getattr(fn, "__name__", fn), exc)
            else:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()  # every request it changed
        except Exception as exc:
            self.dead = (
                exc
                if isinstance(exc, EngineDeadError)
                else EngineDeadError(f"the engine stopped: its loop failed: {type(exc).__name__}: {exc}")
            )
            logger.error("%s", self.dead)
            self._fail_all(self.dead)
            return
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None and not sink.put(out):
                self._abort([out.request_id])

    def _add(
        self, requests: list[tuple[str, str | None, list[int] | None, SamplingParams]], sink: _Sink, length_field: str | None
    ) -> None:
        if self.dead is not None:
            raise EngineDeadError(str(self.dead))
        self.engine.add_requests(requests, length_field=length_field)
        for request_id, *_ in requests:
            self._sinks[request_id] = sink

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._sinks.pop(request_id, None)
        self.engine.abort(request_ids)

    def _fail_all(self, error: EngineDeadError) -> None:
        sinks, self._sinks = self._sinks, {}
        for sink in set(sinks.values()):
            sink.put(EngineDeadError(str(error)))


def build_engine(args: EngineArgs, placement_strategy: str = "PACK") -> Engine:
    """The engine `args` ask for, checked and configured, in this process's placement group (if
    any); not started."""
    config = args.create_cluster_engine_config(args.find_checked_model())
    return Engine(config, forwarded_env(), ray.util.get_current_placement_group(), placement_strategy)


class StartingEngine:
    """An `AsyncEngine` started by a thread of its own: `progress` meanwhile; `engine` once it is
    up, or `error`, what stopped it."""

    def __init__(self, args: EngineArgs, placement_strategy: str = "PACK", placement_timeout_s: float = 60.0) -> None:
        self.engine: AsyncEngine | None = None
        self.error: BaseException | None = None
        self._starting: Engine | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._start,
            args=(args, placement_strategy, placement_timeout_s),
            name="shardlm-engine-start",
            daemon=True,
        )
        self._thread.start()

    def _start(self, args: EngineArgs, placement_strategy: str, placement_timeout_s: float) -> None:
        try:
            self._starting = build_engine(args, placement_strategy)
            self.engine = AsyncEngine(self._starting, self._starting.start(placement_timeout_s))
        except BaseException as exc:  # the owner reports it
            logger.error("the engine failed to start: %s: %s", type(exc).__name__, exc)
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def phase(self) -> str:
        """The engine's start-up phase ("" before it is configured)."""
        return self._starting.phase if self._starting is not None else ""

    def progress(self, timeout_s: float = 1.0) -> StartProgress | None:
        """Where the start has got (None before the engine is configured); blocks up to
        `timeout_s` for the ranks' answers."""
        engine = self._starting
        return None if engine is None else engine.progress(timeout_s)

    async def wait(self, timeout_s: float) -> AsyncEngine | None:
        """The engine once it is up, waiting up to `timeout_s` for it (None if it is still
        starting then); EngineDeadError if it failed to start."""
        if not self.done:
            await asyncio.get_running_loop().run_in_executor(None, self._done.wait, timeout_s)
        if self.error is not None:
            raise EngineDeadError(f"the engine failed to start: {type(self.error).__name__}: {self.error}")
        return self.engine

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Shut the engine down; one still starting has its ranks killed, which ends its start."""
        starting = self._starting
        if not self.done and starting is not None:
            starting.shutdown(graceful=False)
        self._done.wait(timeout_s)
        if self.engine is not None:
            self.engine.shutdown(timeout_s)


class _Sink:
    """A caller's queue, on the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> None:
        self.loop, self.queue = loop, q

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand `item` to the caller's loop; False when that loop has closed."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:
            return False


class RequestStream:
    """The outputs of one submission's requests, as they change: iterate it for `RequestOutput`s
    (cumulative text and tokens; a request's last one has finished=True). A slow reader skips
    intermediate outputs rather than falling behind. Closing it, or dropping it, aborts what has
    not finished, so that its KV blocks go back to the pool."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.queue: asyncio.Queue = asyncio.Queue()
        self._unfinished = set(request_ids)
        self._ready: list[RequestOutput] = []

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._ready:
            if not self._unfinished:
                raise StopAsyncIteration
            self._ready = await self._next_batch()
        return self._ready.pop(0)

    async def _next_batch(self) -> list[RequestOutput]:
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        latest: dict[str, RequestOutput] = {}
        for item in items:
            if isinstance(item, BaseException):
                self._unfinished.clear()  # the engine has dropped them
                raise item
            latest[item.request_id] = item
        for out in latest.values():
            if out.finished:
                self._unfinished.discard(out.request_id)
        return list(latest.values())

    def close(self) -> None:
        """Abort the requests that have not finished; safe to call twice."""
        if self._unfinished:
            self.engine.abort(sorted(self._unfinished))
            self._unfinished.clear()

    def forget(self) -> None:
        """Stop tracking the requests without aborting them (they were never queued)."""
        self._unfinished.clear()

    def __del__(self) -> None:
        self.close()
