"""Joining Ray: what actors are given of this process's environment, and a missing model refused
before any cluster starts."""

from __future__ import annotations

import subprocess
import sys

from cluster import connect


def test_actors_get_the_forwarded_environment_unless_the_local_cluster_inherited_it(ray_cluster, monkeypatch) -> None:
    assert not connect.started_local_cluster(), "the session's cluster was not started by connect()"
    assert connect.actor_env() == connect.forwarded_env()
    here = {"address": ray_cluster.get_runtime_context().gcs_address, "env": connect.forwarded_env()}
    monkeypatch.setattr(connect, "_local", here)
    assert connect.started_local_cluster() and connect.actor_env() == {}
    monkeypatch.setenv("SHARDLM_SET_AFTER_THE_START", "1")
    assert connect.actor_env() == connect.forwarded_env(), "a variable set since: all of them travel"
    assert connect.runtime_env_options({}) == {}
    assert connect.runtime_env_options({"A": "1"}) == {"runtime_env": {"env_vars": {"A": "1"}}}


def test_a_missing_local_model_is_refused_before_any_cluster_starts(tmp_path) -> None:
    script = (
        "import ray; from driver.entrypoints.llm import discover_and_connect; from parallel.errors import ModelNotFound\n"
        f"try:\n    discover_and_connect({str(tmp_path / 'absent.gguf')!r}, {{}}, None)\n"
        "except ModelNotFound as exc:\n    print(ray.is_initialized(), exc)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False model ") and "no such file or folder" in done.stdout


def test_cluster_device_resolves_auto_by_the_cluster_and_refuses_cuda_without_gpus(monkeypatch) -> None:
    import pytest

    from parallel.errors import ConfigError

    monkeypatch.setattr(connect.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(connect, "gpu_capability", lambda: (9, 0))
    monkeypatch.setattr(connect, "cluster_has_gpus", lambda: True)
    assert connect.cluster_device("auto") == ("cuda", (9, 0))  # a GPU node this process need not have
    assert connect.cluster_device("auto", probe_capability=False) == ("cuda", None)
    assert connect.cluster_device("cpu") == ("cpu", None)
    monkeypatch.setattr(connect, "cluster_has_gpus", lambda: False)
    assert connect.cluster_device("auto") == ("cpu", None)
    with pytest.raises(ConfigError, match="the Ray cluster has no GPU") as err:
        connect.cluster_device("cuda")
    assert err.value.field == "device"
    monkeypatch.setattr(connect.ray, "is_initialized", lambda: False)  # before `serve run` joins one
    assert connect.cluster_device("cuda", probe_capability=False) == ("cuda", None)
