"""Joining a Ray cluster, or starting a local one, and shutting down the one this process started."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import ray

logger = logging.getLogger(f"shardlm.{__name__}")

FORWARDED_ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_", "SHARDLM_", "TQDM_")
FORWARDED_ENV = ("XDG_CACHE_HOME",)

_local: dict[str, Any] = {}
"""The local cluster `connect` started in this process: its GCS address and the forwarded
environment its processes inherited (empty when this process started none)."""


def connect(address: str | None = None, num_cpus: int = 1) -> None:
    """Join the cluster this process already joined, else `address` or RAY_ADDRESS, else start a
    local cluster with at least `num_cpus` logical CPUs (CPU-only ranks each take one)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    cpus = max(os.cpu_count() or 1, num_cpus)
    logger.info("starting a local Ray cluster with %d logical CPUs", cpus)
    env = forwarded_env()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    _local.update(address=_gcs_address(), env=env)


def _gcs_address() -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # not connected
        return None


def started_local_cluster() -> bool:
    """Whether this process is connected to a local cluster that `connect` started here."""
    return bool(_local) and ray.is_initialized() and _gcs_address() == _local["address"]


def forwarded_env() -> dict[str, str]:
    """The environment workers need from this process: Hugging Face and cache settings, log level."""
    return {
        k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }


def actor_env() -> dict[str, str]:
    """The variables of `forwarded_env` that actors must be given in their runtime environment:
    none when the local cluster started here already holds them all (its processes inherited
    this process's environment), so that actors take the worker processes Ray starts in
    advance instead of waiting for new ones; else all of them."""
    env = forwarded_env()
    return {} if started_local_cluster() and env == _local["env"] else env


def runtime_env_options(env: dict[str, str]) -> dict[str, Any]:
    """`.options(...)` that give an actor `env`: none at all for an empty one (a runtime
    environment, even an empty one, keeps an actor off the workers started in advance)."""
    return {"runtime_env": {"env_vars": env}} if env else {}


def shutdown_local_cluster() -> None:
    """Shut down the local cluster `connect` started in this process (nothing otherwise), without
    the waits of Ray's exit handler: its autoscaler monitor is killed first (asked to stop after
    the GCS server has gone, it waits a second to report so), and there is no half-second
    pause for logs at exit."""
    if not started_local_cluster():
        return
    _kill_monitor()
    ray.shutdown()
    _local.clear()


def _kill_monitor() -> None:
    """SIGKILL the local cluster's autoscaler monitor; on a Ray whose internals differ, nothing."""
    try:
        node = ray._private.worker._global_node
        for info in node.all_processes.get(ray._private.ray_constants.PROCESS_TYPE_MONITOR, []):
            if info.process.poll() is None:
                os.kill(info.process.pid, signal.SIGKILL)
                info.process.wait(timeout=5)
    except Exception as exc:  # the normal shutdown still stops it
        logger.debug("could not stop the autoscaler monitor early: %s", exc)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def gpu_capability(timeout_s: float = 120) -> tuple[int, int]:
    """The compute capability of the cluster's GPUs: of this process's GPU, else probed on one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()

    @ray.remote(num_gpus=1)
    def probe() -> tuple[int, int]:
        import torch

        return torch.cuda.get_device_capability()

    return tuple(ray.get(probe.remote(), timeout=timeout_s))
