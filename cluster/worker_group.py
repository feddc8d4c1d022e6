"""Worker actors, one per rank, each pinned to its bundle, and the collective-call helper."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.connect import runtime_env_options
from cluster.logs import configure_actor_logging
from cluster.placement import Placement
from parallel.errors import EngineDeadError, ShardLMError
from parallel.shm_allreduce import PeerExited
from workers.batch import Batch, StepResult
from workers.config import EngineConfig
from workers.progress import RankProgress

logger = logging.getLogger(f"shardlm.{__name__}")

STEP_SUBMIT_TIMEOUT_S = 60.0


class WorkerActor:
    """The Ray actor around one rank's `workers.worker.Worker`.

    Everything the rank computes (`execute`, `serve_steps`) runs on one thread, the "compute"
    concurrency group's. On CPU this is what keeps torch's OpenMP threads at full speed: libgomp
    gives each thread that starts parallel work a team of its own, and once its threads outnumber
    the cores it throttles every team's spin-wait to almost nothing, so that a second thread's
    matrix products keep the cores about 1.6 busy of 2 instead of 2 (a SmolLM2 step at batch 32
    takes about 1.5 times as long). Only the compiled graph's `execute_step` runs on a thread of
    its own (Ray's); it stays the fallback on CPU.
    """

    def __init__(self, config: EngineConfig, rank: int, world_size: int) -> None:
        from workers.worker import Worker

        configure_actor_logging()
        self.rank = rank
        self.worker = Worker(config, rank, world_size)
        self._step_thread_bound = False
        """Whether the compiled graph's thread has been given this rank's device (its first step)."""
        self.compute_threads: set[int] = set()
        """The threads that have run this rank's work (one, but for a compiled graph's)."""

    def _bind_device_to_step_thread(self) -> None:
        device = getattr(self.worker, "device", None)
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.set_device(device)  # the current device is per thread

    def __repr__(self) -> str:
        return f"shardlm-rank{self.rank}"  # Ray's prefix of this actor's log lines: (shardlm-rank1 pid=...)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a port free on it now, for the process group's rendezvous."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="compute")
    def execute(self, method: str, *args: Any) -> Any:
        self.compute_threads.add(threading.get_ident())
        return getattr(self.worker, method)(*args)

    def execute_step(self, message: bytes) -> bytes | None:
        """One engine step from its encoded `Batch` (the same bytes for every rank); rank 0
        answers the encoded `StepResult`. Runs on the compiled graph's own thread."""
        if not self._step_thread_bound:
            self._bind_device_to_step_thread()
            self._step_thread_bound = True
            self.compute_threads.add(threading.get_ident())
        return self._run_step(STEP_DECODER.decode(message))

    def attach_step_channel(self, offer: tuple[str, bytes, tuple[int, int, int]]) -> bool:
        """Map the driver's step channel (`cluster.step_channel`); False where this rank cannot."""
        from cluster.step_channel import StepReader

        self._reader = StepReader.attach(self.rank, offer)
        return self._reader is not None

    def detach_step_channel(self) -> None:
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None:
            reader.close()

    @ray.method(concurrency_group="compute")
    def serve_steps(self) -> int:
        """Run every step the driver writes into the channel, on the compute thread, until the
        driver closes it; how many ran. A call to `execute` waits until the loop has ended."""
        self._bind_device_to_step_thread()
        self.compute_threads.add(threading.get_ident())
        reader, self._reader = self._reader, None
        try:
            return reader.serve(STEP_DECODER.decode, self._run_step)
        finally:
            reader.close()

    def _run_step(self, batch: Batch) -> bytes | None:
        """One engine step; rank 0's encoded `StepResult` (None on the other ranks)."""
        result = self.worker.execute_model(batch)
        return None if result is None else STEP_ENCODER.encode(result)

    @ray.method(concurrency_group="progress")
    def progress(self) -> RankProgress:
        """Where the rank's start-up has got: answered by a second thread while `execute` runs."""
        return self.worker.progress_snapshot()


RemoteWorker = ray.remote(concurrency_groups={"progress": 1, "compute": 1})(WorkerActor)

STEP_ENCODER = msgspec.msgpack.Encoder()
STEP_DECODER = msgspec.msgpack.Decoder(Batch)
RESULT_DECODER = msgspec.msgpack.Decoder(StepResult)
STEP_DISPATCH_ENV = "SHARDLM_STEP_DISPATCH"
"""How steps reach the ranks: "shm" (`cluster.step_channel`), "compiled" (a Ray Compiled Graph) or
"plain" (actor calls). Unset: on CPU the shared-memory channel where every rank can map it, else
a compiled graph; on CUDA, where neither has run yet, plain calls."""
DISPATCHES = ("shm", "compiled", "plain")


def step_dispatch_wanted(device: str) -> tuple[str, str]:
    """The step dispatch to try first, and why (for the log)."""
    value = os.environ.get(STEP_DISPATCH_ENV, "").strip()
    if value:
        if value not in DISPATCHES:
            raise ShardLMError(f"{STEP_DISPATCH_ENV}={value!r} is not one of {', '.join(DISPATCHES)}")
        return value, f"{STEP_DISPATCH_ENV}={value}"
    if device == "cuda":
        return "plain", f"the shared-memory channel and compiled graphs have not run on CUDA yet: set {STEP_DISPATCH_ENV}"
    return "shm", "the default on CPU"


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def worker_error(rank: int, method: str, error: Exception) -> ShardLMError:
    """A shardlm error that names the rank, the call, and the worker's own cause and traceback
    (without the colour codes Ray puts in a task error's text)."""
    failure = _worker_error(rank, method, error)
    text = ANSI_CODES.sub("", str(failure))
    if text == str(failure):
        return failure
    clean = type(failure)(text)
    clean.__dict__.update(vars(failure))  # ConfigError's field
    return clean


def _worker_error(rank: int, method: str, error: Exception) -> ShardLMError:
    if isinstance(error, RayActorError):
        return EngineDeadError(f"rank {rank} died during {method}: {error}")
    cause = getattr(error, "cause", None)
    if isinstance(cause, ShardLMError):
        return type(cause)(f"rank {rank} ({method}): {cause}")
    kind = type(cause).__name__ if cause is not None else type(error).__name__
    return EngineDeadError(f"rank {rank} failed in {method}: {kind}: {cause if cause is not None else error}\n{error}")


def gather(refs: Sequence[ray.ObjectRef], method: str, timeout_s: float | None) -> list[Any]:
    """Every rank's answer, in rank order; on the first failure, an error naming its rank at once
    (the other ranks may be blocked in a collective with it, so nobody waits for them)."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            late = sorted(rank_of[r] for r in pending)
            raise EngineDeadError(f"{method} did not finish within {timeout_s:.0f} s on rank(s) {late}")
        rank = rank_of[ready[0]]
        try:
            results[rank] = ray.get(ready[0])
        except (RayTaskError, RayActorError) as exc:
            raise worker_error(rank, method, exc) from exc
    return results


class PendingStep:
    """A step sent to the ranks; `result` waits for it."""

    def __init__(self, group: WorkerGroup, refs: list[Any] | None, how: str, number: int = 0) -> None:
        self.group, self.refs, self.how, self.number = group, refs, how, number

    def result(self, timeout_s: float) -> StepResult:
        """Rank 0's result once every rank has finished the step; an error naming the rank that failed."""
        if self.how == "shm":
            return self.group.channel.result(self.number, RESULT_DECODER.decode, timeout_s)
        if self.how == "plain":
            return gather(self.refs, "execute_model", timeout_s)[0]
        results = []
        for rank, ref in enumerate(self.refs):
            try:
                results.append(ray.get(ref, timeout=timeout_s))
            except Exception as exc:  # noqa: BLE001  named by rank below
                raise self.group._step_error(rank, exc) from exc
        return RESULT_DECODER.decode(results[0])


class WorkerGroup:
    """The engine's worker actors and the one way to call them. Steps go through the shared-memory
    step channel where every rank can map it (`cluster.step_channel`), else through a Ray Compiled
    Graph, else through plain calls (`set_up_step_dispatch`)."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self.step_graph: Any = None
        self.channel: Any = None
        self.serving: list[Any] = []
        """The ranks' `serve_steps` calls, running while the channel is open."""
        self.step_dispatch = "plain calls"
        """How steps reach the ranks, for the load report and tests."""

    def set_up_step_dispatch(self, device: str, timeout_s: float) -> None:
        """Open the step channel, or build a compiled graph, as `step_dispatch_wanted` says, each
        falling back to the next (shared memory, compiled graph, plain calls) where it cannot be
        set up, saying why once."""
        wanted, why = step_dispatch_wanted(device)
        if wanted == "shm":
            if self._open_channel(timeout_s):
                return
            wanted = "compiled"
        if wanted == "compiled":
            self._compile_step()
            return
        logger.info("steps go to the ranks as plain Ray calls (%s)", why)

    def _open_channel(self, timeout_s: float) -> bool:
        from cluster.step_channel import StepChannel
        from parallel.shm import supported

        if not supported():
            logger.info("steps go through a compiled graph: the shared-memory step channel needs x86-64's store order")
            return False
        try:
            channel = StepChannel(len(self.actors), timeout_s, check=self._loops_running)
        except OSError as exc:
            logger.warning("steps cannot go through shared memory (%s): trying a compiled graph", exc)
            return False
        try:
            attached = self.call_actor("attach_step_channel", channel.offer())
        except BaseException:
            channel.close()
            raise
        channel.attached()
        if not all(attached):
            logger.warning(
                "steps cannot go through shared memory: rank(s) %s cannot map it (another host): trying a compiled graph",
                [r for r, ok in enumerate(attached) if not ok],
            )
            self.call_actor("detach_step_channel")
            channel.close()
            return False
        self.channel, self.step_dispatch = channel, "shared memory"
        self.serving = [actor.serve_steps.remote() for actor in self.actors]
        return True

    def _loops_running(self) -> None:
        """Raise, naming the rank, when a rank's step loop has ended (its actor died, or the loop failed)."""
        done, _ = ray.wait(self.serving, num_returns=1, timeout=0)
        if not done:
            return
        rank = self.serving.index(done[0])
        try:
            steps = ray.get(done[0])
        except (RayTaskError, RayActorError) as exc:
            raise worker_error(rank, "execute_model", exc) from exc
        raise EngineDeadError(f"rank {rank}'s step loop ended after {steps} steps while the driver waited for it")

    def _compile_step(self) -> None:
        """Build the compiled graph of `execute_step` over every rank: the driver writes each
        step's message once into shared-memory channels (one node) or Ray's transport (across
        nodes) that every rank reads. Where it cannot be built, steps stay plain calls and the
        reason is logged once."""
        if not logger.isEnabledFor(logging.DEBUG):
            logging.getLogger("ray.dag").setLevel(logging.WARNING)  # its INFO lines at teardown
        try:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as message:
                dag = MultiOutputNode([actor.execute_step.bind(message) for actor in self.actors])
            self.step_graph = dag.experimental_compile(_submit_timeout=STEP_SUBMIT_TIMEOUT_S)
            self.step_dispatch = "compiled graph"
        except Exception as exc:  # noqa: BLE001  an old Ray, a transport it refuses: plain calls work
            logger.warning(
                "steps go to the ranks as plain Ray calls: a compiled graph could not be built (%s: %s)", type(exc).__name__, exc
            )
            self.step_graph = None

    def submit_step(self, batch: Batch) -> PendingStep:
        """Send one step to every rank without waiting: its result comes from `PendingStep.result`.
        Steps run on the ranks in the order they are sent (the channel and a compiled graph hold
        two in flight; an actor runs plain calls in order), and their results must be taken in that order."""
        if self.channel is not None:
            return PendingStep(self, None, "shm", self.channel.send(STEP_ENCODER.encode(batch)))
        if self.step_graph is None:
            return PendingStep(self, [actor.execute.remote("execute_model", batch) for actor in self.actors], "plain")
        try:
            refs = self.step_graph.execute(STEP_ENCODER.encode(batch))
        except Exception as exc:  # noqa: BLE001  a closed channel: a rank died since the last step
            raise self._step_error(0, exc) from exc
        return PendingStep(self, refs, "compiled")

    def _step_error(self, rank: int, error: Exception) -> ShardLMError:
        """The error of a failed compiled step, naming the rank that died if one did (the channel
        error itself may come from a survivor's read, and a survivor's shared-memory collective
        raises PeerExited), else the rank that raised."""
        if isinstance(error, RayTaskError) and not isinstance(error.cause, PeerExited):
            return worker_error(rank, "execute_model", error)
        for other, actor in enumerate(self.actors):
            try:
                ray.get(actor.node_id.remote(), timeout=5)
            except (RayActorError, GetTimeoutError) as exc:
                return EngineDeadError(f"rank {other} died during execute_model: {exc}")
        kind = type(error).__name__
        return EngineDeadError(f"execute_model failed in the compiled graph (rank {rank}'s answer): {kind}: {error}")

    def teardown_step(self) -> None:
        """End the step loops on the ranks, the channel's or the compiled graph's (before the ranks
        are shut down or killed)."""
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
            serving, self.serving = self.serving, []
            ray.wait(serving, num_returns=len(serving), timeout=5)  # loops end within a futex slice
        graph, self.step_graph = self.step_graph, None
        if graph is None:
            return
        dag_logger = logging.getLogger("ray.dag")
        saved = dag_logger.level
        if not logger.isEnabledFor(logging.DEBUG):
            dag_logger.setLevel(logging.CRITICAL)  # a dead rank's loop cannot be cancelled: said already
        try:
            graph.teardown()
        except Exception as exc:  # noqa: BLE001  a dead rank's loop is gone already
            logger.debug("tearing down the step graph: %s", exc)
        finally:
            dag_logger.setLevel(saved)

    @classmethod
    def start(cls, config: EngineConfig, placement: Placement, env: dict[str, str]) -> WorkerGroup:
        world_size = len(placement.bundle_indices)
        actors = []
        for rank, bundle_index in enumerate(placement.bundle_indices):
            strategy = PlacementGroupSchedulingStrategy(placement.group, placement_group_bundle_index=bundle_index)
            actors.append(
                RemoteWorker.options(
                    num_cpus=placement.bundle.get("CPU", 0),
                    num_gpus=placement.bundle.get("GPU", 0),
                    scheduling_strategy=strategy,
                    name=None,
                    **runtime_env_options(env),
                ).remote(config, rank, world_size)
            )
        return cls(actors)

    def call(
        self, method: str, *args: Any, timeout_s: float | None = None, rank_args: Sequence[tuple] | None = None
    ) -> list[Any]:
        """Run `Worker.<method>` on every rank at once (rank r with `rank_args[r]` when given)."""
        paused = self._pause_channel(method)
        try:
            refs = [
                actor.execute.remote(method, *(rank_args[rank] if rank_args is not None else args))
                for rank, actor in enumerate(self.actors)
            ]
            return gather(refs, method, timeout_s)
        finally:
            if paused is not None:
                self._reopen_channel(paused)

    def _pause_channel(self, method: str) -> float | None:
        """End the ranks' step loops, which hold their compute threads, before a call to `method`
        (the call waits on each rank until the loop has returned); the channel's timeout, to open
        a new one after the call (None: no channel was open). Refused while a step is unanswered:
        its result would be lost."""
        channel = self.channel
        if channel is None:
            return None
        if channel.unanswered:
            raise ShardLMError(f"{method} while {channel.unanswered} step(s) are running on the ranks: take their results first")
        self.channel, self.serving = None, []
        channel.close()
        return channel.timeout_s

    def _reopen_channel(self, timeout_s: float) -> None:
        """A new step channel after a call that paused the last one; plain calls where it cannot
        be opened (a rank has died, say: the next step names it)."""
        if not self.actors:
            return
        try:
            if self._open_channel(timeout_s):
                return
        except ShardLMError as exc:
            logger.warning("the step channel could not be opened again (%s): steps go as plain Ray calls", exc)
        self.step_dispatch = "plain calls"

    def call_actor(self, method: str, *args: Any, ranks: Sequence[int] | None = None, timeout_s: float | None = 120) -> list[Any]:
        """Run a method of the actor itself (not of its Worker) with `args` on `ranks` (all by default)."""
        chosen = list(range(len(self.actors))) if ranks is None else list(ranks)
        return gather([getattr(self.actors[r], method).remote(*args) for r in chosen], method, timeout_s)

    def poll_progress(self, timeout_s: float = 1.0) -> list[RankProgress]:
        """The start-up progress of the ranks that answer within `timeout_s` (a rank still being
        created, or gone, is left out; the start-up calls report real failures)."""
        refs = [actor.progress.remote() for actor in list(self.actors)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        answers = []
        for ref in ready:
            try:
                answers.append(ray.get(ref))
            except (RayTaskError, RayActorError):
                continue
        return sorted(answers, key=lambda p: p.rank)

    def shutdown(self, timeout_s: float = 30) -> None:
        """Ask every rank to leave its process group, then end the actors whatever they answered."""
        self.teardown_step()
        try:
            self.call("shutdown", timeout_s=timeout_s)
        except (ShardLMError, GetTimeoutError) as exc:
            logger.info("workers did not shut down cleanly (%s); killing them", exc)
        self.kill()

    def kill(self) -> None:
        """End the actors now (a rank blocked in a collective with a failed one never answers)."""
        self.teardown_step()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
