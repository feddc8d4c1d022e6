"""Sleep level 1's host copy: parameters leave the device and come back unchanged, tied ones as one."""

from __future__ import annotations

import torch

from driver.args import EngineArgs
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
