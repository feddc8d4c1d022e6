"""Worker actors, one per rank, each pinned to its bundle, and the collective-call helper."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.connect import runtime_env_options
from cluster.logs import configure_actor_logging
from cluster.placement import Placement
from parallel.errors import EngineDeadError, ShardLMError
from workers.config import EngineConfig
from workers.progress import RankProgress

logger = logging.getLogger(f"shardlm.{__name__}")


class WorkerActor:
    """The Ray actor around one rank's `workers.worker.Worker`."""

    def __init__(self, config: EngineConfig, rank: int, world_size: int) -> None:
        from workers.worker import Worker

        configure_actor_logging()
        self.rank = rank
        self.worker = Worker(config, rank, world_size)

    def __repr__(self) -> str:
        return f"shardlm-rank{self.rank}"  # Ray's prefix of this actor's log lines: (shardlm-rank1 pid=...)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a port free on it now, for the process group's rendezvous."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def execute(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    @ray.method(concurrency_group="progress")
    def progress(self) -> RankProgress:
        """Where the rank's start-up has got: answered by a second thread while `execute` runs."""
        return self.worker.progress_snapshot()


RemoteWorker = ray.remote(concurrency_groups={"progress": 1})(WorkerActor)


def worker_error(rank: int, method: str, error: Exception) -> ShardLMError:
    """A shardlm error that names the rank, the call, and the worker's own cause and traceback."""
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


class WorkerGroup:
    """The engine's worker actors and the one way to call them."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    @classmethod
    def start(cls, config: EngineConfig, placement: Placement, env: dict[str, str]) -> "WorkerGroup":
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

    def call(self, method: str, *args: Any, timeout_s: float | None = None, rank_args: Sequence[tuple] | None = None) -> list[Any]:
        """Run `Worker.<method>` on every rank at once (rank r with `rank_args[r]` when given)."""
        refs = [
            actor.execute.remote(method, *(rank_args[rank] if rank_args is not None else args))
            for rank, actor in enumerate(self.actors)
        ]
        return gather(refs, method, timeout_s)

    def call_actor(self, method: str, ranks: Sequence[int] | None = None, timeout_s: float | None = 120) -> list[Any]:
        """Run a method of the actor itself (not of its Worker) on `ranks` (all by default)."""
        chosen = list(range(len(self.actors))) if ranks is None else list(ranks)
        return gather([getattr(self.actors[r], method).remote() for r in chosen], method, timeout_s)

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
        try:
            self.call("shutdown", timeout_s=timeout_s)
        except (ShardLMError, GetTimeoutError) as exc:
            logger.info("workers did not shut down cleanly (%s); killing them", exc)
        self.kill()

    def kill(self) -> None:
        """End the actors now (a rank blocked in a collective with a failed one never answers)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
