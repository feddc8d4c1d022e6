"""Joining a Ray cluster, or starting a local one, and shutting down the one this process started.

A local cluster that `connect` starts ends with this process: SIGTERM is turned into
`Terminated` (a KeyboardInterrupt) in the main thread, so that the command's own cleanup runs as
at Ctrl-C, and `shutdown_local_cluster` ends every process of the head node (the raylet, its
agents and workers, Serve's actors) rather than leaving them to notice the driver has gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import ray

from cluster.logs import quiet_ray_loggers, ray_level

logger = logging.getLogger(f"shardlm.{__name__}")

TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray says, at every ray.init, whether token authentication is on."""
SHUTDOWN_GRACE_S = 2.0
"""How long the head node's processes have to end after ray.shutdown() before they are killed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while this process holds a local cluster it started."""


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
        with _token_notice(show=False):
            ray.init(address=address, logging_level=ray_level(), log_to_driver=True)
        quiet_ray_loggers()
        return
    cpus = max(os.cpu_count() or 1, num_cpus)
    logger.info("starting a local Ray cluster with %d logical CPUs", cpus)
    env = forwarded_env()
    previous = signal.getsignal(signal.SIGTERM)  # ray.init replaces it
    with _token_notice(show=True):
        # address="local": a new cluster even where `ray start` left one running on this machine
        # (which ray.init() would join, and then refuse num_cpus); join one with RAY_ADDRESS
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=ray_level())
    quiet_ray_loggers()
    _local.update(address=_gcs_address(), env=env, sigterm=_catch_sigterm(previous))


class _Notices(logging.Filter):
    """Keeps Ray's token-authentication notice from its handlers, and collects it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


@contextlib.contextmanager
def _token_notice(show: bool) -> Iterator[None]:
    """Ray's token-authentication notice, said at each ray.init: with `show`, passed on once as
    shardlm's INFO record (so -q drops it), else dropped."""
    notices = _Notices()
    ray_logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    ray_logger.addFilter(notices)
    try:
        yield
    finally:
        ray_logger.removeFilter(notices)
    if show:
        for message in dict.fromkeys(notices.messages):
            logger.info("Ray: %s", message)


def _catch_sigterm(previous: Any) -> Any:
    """Turn SIGTERM into `Terminated` in the main thread (Ray's own handler prints a native
    stack trace and exits without cleanup); the handler to restore at shutdown, or None where
    none was installed (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    return previous


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
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}


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
    pause for logs at exit. Nothing Ray's actors print meanwhile is shown (Serve's controller
    reports its own death as a failed task), and whatever process of the head node (an agent,
    a worker) is still there SHUTDOWN_GRACE_S after is killed. SIGTERM's handler is restored."""
    if not started_local_cluster():
        return
    processes = _head_processes()
    _kill_monitor()
    with worker_logs_muted():
        ray.shutdown()
    _end(processes, SHUTDOWN_GRACE_S)
    if _local.get("sigterm") is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _local["sigterm"])
    _local.clear()


@contextlib.contextmanager
def worker_logs_muted() -> Iterator[None]:
    """While inside, Ray's driver prints none of its actors' lines, nor the errors Ray reports
    (as it does while a debugger holds the terminal); on a Ray whose internals differ, nothing."""
    worker = getattr(ray._private, "worker", None)
    saved = getattr(worker, "_worker_logs_enabled", None)
    if saved is None:
        yield
        return
    worker._worker_logs_enabled = False
    try:
        yield
    finally:
        worker._worker_logs_enabled = saved


def _head_processes() -> list[psutil.Process]:
    """The processes the local head node started (GCS, raylet, agents, ...) and their descendants
    (the raylet's workers: actors, Serve's controller, proxy and replicas)."""
    try:
        node = ray._private.worker._global_node
        pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
    except Exception as exc:  # ray.shutdown still ends them, if more slowly
        logger.debug("could not list the head node's processes: %s", exc)
        return []
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def _end(processes: list[psutil.Process], grace_s: float) -> None:
    """Wait up to `grace_s` for `processes` to end, then SIGKILL those still running."""
    deadline = time.monotonic() + grace_s
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        if alive:
            time.sleep(0.05)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    if alive:
        logger.debug("killed %d process(es) of the local cluster that outlived ray.shutdown()", len(alive))
        psutil.wait_procs(alive, timeout=5)


def _running(process: psutil.Process) -> bool:
    """Whether `process` (the very one: psutil checks its start time) still runs."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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


def cluster_device(device: str, probe_capability: bool = True) -> tuple[str, tuple[int, int] | None]:
    """Where ranks that run on the cluster compute, and their GPUs' compute capability.

    "auto" is "cuda" when the cluster this process has joined has GPUs (this machine's, as torch
    sees them, before it has joined one: `serve run` builds its app first), else "cpu". "cuda" on
    a joined cluster without GPUs is refused. The capability (with `probe_capability`) is this
    process's GPU's, else probed on one of the cluster's: the ranks' nodes may have GPUs that
    this process lacks.
    """
    from parallel.errors import ConfigError

    if ray.is_initialized():
        gpus = cluster_has_gpus()
    else:
        import torch

        gpus = device == "cuda" or torch.cuda.is_available()
    if device == "cuda" and not gpus:
        raise ConfigError(
            "device='cuda' was asked for, but the Ray cluster has no GPU; use device='cpu' or 'auto'", field="device"
        )
    resolved = ("cuda" if gpus else "cpu") if device == "auto" else device
    return resolved, gpu_capability() if resolved == "cuda" and probe_capability else None


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
