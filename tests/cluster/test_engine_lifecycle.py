"""Engine start-up and shutdown on Ray: failures reported promptly with their rank, nothing left
behind, and a second engine in the same process and cluster."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from driver import LLM
from parallel.errors import ClusterError, EngineAsleepError, InsufficientMemory, WeightLoadError
from tests.helpers import reference_logits

SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=4 * 2**20, device="cpu", skip_tokenizer_init=True)


def live_groups() -> list[dict]:
    from ray.util import placement_group_table

    return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]


def wait_for_cpus(ray, expected: float, timeout_s: float = 20) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = ray.available_resources().get("CPU", 0)
        if free >= expected:
            return free
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


def write_safetensors(tensors: list[tuple[str, torch.Tensor]], path: Path, drop_tail_bytes: int = 0) -> None:
    """A safetensors file with its tensors' data in the given order, optionally cut short."""
    header, offset = {}, 0
    for name, t in tensors:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = b"".join(t.contiguous().numpy().tobytes() for _, t in tensors)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[: len(data) - drop_tail_bytes])


def test_a_rank_failing_to_load_fails_llm_promptly_and_releases_everything(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    """Rank 1's slice of the last (row-parallel) tensor lies past the end of the file; rank 0 reads
    its own slice and then waits for rank 1 in the row exchange, which never comes."""
    source, _ = tiny_checkpoint("llama_8h4kv")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    last = "model.layers.1.mlp.down_proj.weight"
    ordered = [(n, t) for n, t in sorted(tensors.items()) if n != last] + [(last, tensors[last])]
    write_safetensors(ordered, folder / "model.safetensors", drop_tail_bytes=64)
    cpus = ray_cluster.available_resources()["CPU"]
    started = time.monotonic()
    with pytest.raises(WeightLoadError, match=r"^rank 1 \(load_model\): .*model\.safetensors ends early"):
        LLM(str(folder), tensor_parallel_size=2, **SMALL)
    assert time.monotonic() - started < 60, "the failure must not wait for the collective timeout"
    assert not live_groups()
    assert wait_for_cpus(ray_cluster, cpus) >= cpus


def test_placement_that_cannot_be_met_names_the_resources(ray_cluster, tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama_8h4kv")
    with pytest.raises(
        ClusterError, match=r"could not place 8 bundle\(s\) of \{'CPU': 1\.0\} \(PACK\).*it has CPU 4.* in all.*ray status"
    ):
        LLM(str(folder), tensor_parallel_size=8, placement_timeout_s=2, **dict(SMALL, num_gpu_blocks_override=64))
    assert not live_groups()


def test_no_room_for_one_block(ray_cluster, tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama_8h4kv")
    with pytest.raises(
        InsufficientMemory,
        match=r"no room for the KV cache on rank [01]: it can give 100 bytes .* the null block and one more take 8192 bytes",
    ):
        LLM(str(folder), tensor_parallel_size=2, **dict(SMALL, kv_cache_memory_bytes=100))
    assert not live_groups()


def test_a_dead_worker_ends_the_engine_and_another_model_starts_in_the_same_process(
    ray_cluster, tiny_checkpoint, tmp_path
) -> None:
    import ray

    from driver import EngineDeadError, SamplingParams

    llama, llama_hf = tiny_checkpoint("llama_8h4kv")
    qwen, qwen_hf = tiny_checkpoint("qwen2")
    cpus = ray_cluster.available_resources()["CPU"]
    first = LLM(str(llama), tensor_parallel_size=2, **SMALL)
    assert len(live_groups()) == 1
    ref = reference_logits(llama_hf, [[1, 2, 3]])[0]
    torch.testing.assert_close(first.prompt_logits([[1, 2, 3]])[0], ref, atol=1e-4, rtol=0)
    assert first.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    before = _greedy(first)
    _sleep_and_wake(first, before)
    first.save_sharded_state(str(tmp_path / "sharded"))
    worker = ray.get(first._engine.__ray_call__.remote(lambda engine: engine.workers.actors[1]))
    ray.kill(worker, no_restart=True)
    with pytest.raises(EngineDeadError, match="rank 1 died during execute_model"):
        first.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(EngineDeadError, match="create a new LLM"):
        first.generate([[1, 2, 3]], use_tqdm=False)
    first.shutdown()
    first.shutdown()  # twice is harmless
    assert not live_groups()
    assert wait_for_cpus(ray_cluster, cpus) >= cpus
    with pytest.raises(Exception, match="has been shut down"):
        first.prompt_logits([[1]])
    with LLM(str(qwen), tensor_parallel_size=1, **SMALL) as second:
        ref = reference_logits(qwen_hf, [[5, 6, 7, 8]])[0]
        torch.testing.assert_close(second.prompt_logits([[5, 6, 7, 8]])[0], ref, atol=1e-4, rtol=0)
    with LLM(str(tmp_path / "sharded"), tensor_parallel_size=2, **SMALL) as third:
        assert {r.load_format for r in third.load_report.ranks} == {"sharded_state"}
        assert _greedy(third) == before
    assert not live_groups()


def _greedy(llm) -> list[list[int]]:
    from driver import SamplingParams

    outputs = llm.generate(
        [[1, 2, 3], [7, 8, 9, 10, 11]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


def _sleep_and_wake(llm, before: list[list[int]]) -> None:
    """Both sleep levels: requests refused while asleep, sleeping twice and waking when awake
    harmless, the same greedy tokens after."""
    llm.wake_up()  # awake: nothing to do
    assert "wake" not in llm.load_report.phases
    for level in (1, 2):
        llm.sleep(level)
        llm.sleep(level)
        with pytest.raises(EngineAsleepError, match=rf"asleep \(sleep level {level}\): call wake_up\(\)"):
            llm.generate([[1, 2, 3]], use_tqdm=False)
        llm.wake_up()
        assert _greedy(llm) == before
    assert llm.load_report.phases["wake"] > 0
