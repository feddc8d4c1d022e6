"""Sleep level 1's host copy: parameters leave the device and come back unchanged, tied ones as one."""

from __future__ import annotations

import torch

from driver.config.args import EngineArgs
from parallel.state import TensorParallelGroup
from workers.loader import load_model
from workers.sleep_mode import HostCopy


def test_a_host_copy_frees_the_parameters_and_restores_them_exactly(tiny_checkpoint) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("llama_tied")[0]), device="cpu").create_engine_config()
    model, _ = load_model(config, TensorParallelGroup.single(), torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    copy = HostCopy(model, move=True)  # the CUDA path's logic, on the CPU
    assert all(p.numel() == 0 for p in model.parameters())
    assert copy.nbytes == sum(v.numel() * v.element_size() for v in before.values())
    copy.restore()
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one parameter


def test_on_cpu_the_weights_stay_where_they_are(tiny_checkpoint) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("llama_tied")[0]), device="cpu").create_engine_config()
    model, _ = load_model(config, TensorParallelGroup.single(), torch.device("cpu"))
    pointers = [p.data_ptr() for p in model.parameters()]
    copy = HostCopy(model)
    assert copy.nbytes == 0 and [p.data_ptr() for p in model.parameters()] == pointers
    copy.restore()
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_a_rank_asleep_at_either_level_wakes_with_the_same_logits_and_pool(tiny_checkpoint) -> None:
    from workers.worker import Worker

    worker = Worker(EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cpu").create_engine_config())
    worker.load_model()
    worker.allocate_kv_cache(8)
    before = worker.prompt_logits([[1, 2, 3, 4]])[0]
    for level in (1, 2):
        worker.sleep(level)
        assert worker.kv_cache is None and (worker.model is None) == (level == 2)
        report = worker.wake_up()
        assert (report is not None) == (level == 2)
        assert worker.kv_cache.num_blocks == 8
        assert torch.equal(worker.prompt_logits([[1, 2, 3, 4]])[0], before)
    worker.shutdown()
