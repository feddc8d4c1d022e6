"""`LLM`: vLLM's entry point, on a Ray cluster."""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cluster.connect import cluster_has_gpus, connect, forwarded_env, gpu_capability
from driver.args import EngineArgs
from driver.engine import EngineActor
from driver.report import LoadReport
from parallel.errors import EngineDeadError, ShardLMError
from workers.models import model_class

logger = logging.getLogger(__name__)


class LLM:
    """A tensor-parallel engine, ready when the constructor returns.

    `LLM(model, tensor_parallel_size=N, **engine_args)` validates the arguments and the parallel
    layout, joins Ray (RAY_ADDRESS, `ray_address`, or a new local cluster), and starts the driver
    actor, which places N ranks, loads each one's weight slices, sizes one KV pool per rank from a
    collective memory profile, and reports what each phase cost (`llm.load_report`).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        ray_address: str | None = None,
        placement_strategy: str = "PACK",
        placement_timeout_s: float = 60.0,
        **engine_args: Any,
    ) -> None:
        self._engine = None
        args = EngineArgs(model=model, **engine_args)
        args.validate()
        connect(ray_address, num_cpus=args.tensor_parallel_size)
        self.config = args.create_engine_config(**_cluster_device(args.device))
        model_class(self.config.model.arch.architecture).check_layout(self.config.model.arch, args.tensor_parallel_size)
        env = forwarded_env()
        current = ray.util.get_current_placement_group()
        self._engine = EngineActor.options(runtime_env={"env_vars": env}).remote(self.config, env, current, placement_strategy)
        try:
            self.load_report: LoadReport = _result(self._engine.start.remote(placement_timeout_s))
        except BaseException:
            self._kill_engine()
            raise

    def prompt_logits(self, prompt_token_ids: list[list[int]]) -> list[Any]:
        """Logits [len(prompt), vocab] at every position of each prompt (float32, on the CPU): for
        checking the engine against a reference."""
        return _result(self._live_engine().prompt_logits.remote(prompt_token_ids))

    def shutdown(self) -> None:
        """Free the workers, their device memory and the placement group. Safe to call twice."""
        if self._engine is None:
            return
        try:
            ray.get(self._engine.shutdown.remote(), timeout=60)
        except Exception as exc:  # the engine is going away either way
            logger.info("engine shutdown: %s", exc)
        self._kill_engine()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def _live_engine(self) -> Any:
        if self._engine is None:
            raise EngineDeadError("this LLM has been shut down; create a new one")
        return self._engine

    def _kill_engine(self) -> None:
        if self._engine is not None:
            ray.kill(self._engine, no_restart=True)
            self._engine = None


def _cluster_device(device: str) -> dict[str, Any]:
    """Resolve device="auto" by the cluster's resources, not this process's: the ranks run there."""
    if device != "auto":
        return {}
    if not cluster_has_gpus():
        return {"device": "cpu"}
    return {"device": "cuda", "capability": gpu_capability()}


def _result(ref: ray.ObjectRef) -> Any:
    """ray.get, with the engine's own shardlm errors raised as themselves."""
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, ShardLMError):
            raise exc.cause from None
        raise
    except RayActorError as exc:
        raise EngineDeadError(f"the engine's driver actor died: {exc}") from exc
