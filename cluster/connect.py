"""Joining a Ray cluster, or starting a local one."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(f"shardlm.{__name__}")

FORWARDED_ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_", "SHARDLM_", "TQDM_")
FORWARDED_ENV = ("XDG_CACHE_HOME",)


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
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)


def forwarded_env() -> dict[str, str]:
    """The environment workers need from this process: Hugging Face and cache settings, log level."""
    return {
        k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }


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
