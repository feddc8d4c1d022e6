"""Placement: an engine started inside a placement group (as under Ray Serve) uses that group."""

from __future__ import annotations

import torch

from cluster.connect import forwarded_env


def test_engine_inside_a_placement_group_uses_its_bundles(ray_cluster, tiny_checkpoint) -> None:
    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    folder, hf = tiny_checkpoint("llama_8h4kv")

    @ray.remote(num_cpus=1)
    class Replica:
        def logits(self, model: str) -> tuple[list, list[str]]:
            from driver import LLM

            with LLM(
                model,
                tensor_parallel_size=2,
                max_num_batched_tokens=256,
                kv_cache_memory_bytes=2**22,
                device="cpu",
                skip_tokenizer_init=True,
            ) as llm:
                live = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
                return llm.prompt_logits([[1, 2, 3, 4]]), [g["placement_group_id"] for g in live]

    group = placement_group([{"CPU": 1}] * 3, strategy="PACK")
    ray.get(group.ready(), timeout=30)
    try:
        strategy = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        replica = Replica.options(scheduling_strategy=strategy).remote()
        logits, live_groups = ray.get(replica.logits.remote(str(folder)), timeout=300)
        assert live_groups == [group.id.hex()], "no placement group besides the replica's own"
        with torch.no_grad():
            ref = hf(torch.tensor([[1, 2, 3, 4]])).logits[0]
        torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=0)
        ray.kill(replica)
    finally:
        remove_placement_group(group)
    assert group.id.hex() in placement_group_table()


def test_forwarded_environment(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SHARDLM_LOG_LEVEL", "INFO")
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/cache")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = forwarded_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["SHARDLM_LOG_LEVEL"] == "INFO" and env["XDG_CACHE_HOME"] == "/tmp/cache"
    assert "UNRELATED_SECRET" not in env
