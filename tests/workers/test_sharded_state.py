"""Pre-sharded checkpoints: each rank's final tensors saved, and read back equal, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from driver.config.args import EngineArgs
from driver.config.model_config import load_hf_config, model_arch
from parallel.errors import ConfigError, WeightLoadError
from parallel.state import TensorParallelGroup
from tests.helpers import hf_model
from tests.quant_packer import Scheme, write_quantized_checkpoint
from workers import loader, sharded_state
from workers.model_files import ModelFiles, find_model

CPU = torch.device("cpu")


def _save(config, folder: Path) -> list[dict[str, torch.Tensor]]:
    """Load every rank of `config` the usual way, save it as a sharded_state; each rank's parameters."""
    tp_size = config.parallel.tensor_parallel_size
    states, parts = [], {}
    for rank in range(tp_size):
        model, _ = loader.load_model(config, TensorParallelGroup(rank=rank, size=tp_size), CPU)
        parts[rank] = len(sharded_state.save_rank(model, rank, str(folder), max_part_bytes=20_000))
        states.append(_bytes(model))
    sharded_state.save_model_files(config, str(folder), parts)
    return states


def _bytes(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().reshape(-1).view(torch.uint8).clone() for k, v in model.named_parameters()}


def _load_rank(folder: Path, rank: int, tp_size: int, **kwargs):
    config = EngineArgs(model=str(folder), device="cpu", tensor_parallel_size=tp_size, **kwargs).create_engine_config()
    return loader.load_model(config, TensorParallelGroup(rank=rank, size=tp_size), CPU)


@pytest.mark.parametrize("tp_size", [1, 2, 3])
def test_every_rank_reads_back_what_it_saved_and_only_its_own_files(tiny_checkpoint, tmp_path, tp_size) -> None:
    config = EngineArgs(
        model=str(tiny_checkpoint("llama_6h")[0]), device="cpu", tensor_parallel_size=tp_size
    ).create_engine_config()
    saved = _save(config, tmp_path)
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert find_model(str(tmp_path)).weight_format == "sharded_state"  # load_format="auto" finds it
    for rank in range(tp_size):
        others = [p for p in tmp_path.glob("model-rank-*") if not p.name.startswith(f"model-rank-{rank}-")]
        for p in others:  # hidden while this rank loads: it must not need them
            p.rename(p.with_suffix(".hidden"))
        model, report = _load_rank(tmp_path, rank, tp_size)
        for p in others:
            p.with_suffix(".hidden").rename(p)
        loaded = _bytes(model)
        assert loaded.keys() == saved[rank].keys()
        assert all(torch.equal(loaded[k], saved[rank][k]) for k in loaded)
        assert report.load_format == "sharded_state" and report.bytes_read == report.checkpoint_bytes
        assert report.tensors_read == len(loaded)


def test_quantized_ranks_stay_quantized(tiny_checkpoint, tmp_path) -> None:
    config = EngineArgs(
        model=str(tiny_checkpoint("llama_6h")[0]), device="cpu", tensor_parallel_size=2, quantization="int8"
    ).create_engine_config()
    saved = _save(config, tmp_path / "int8")
    model, _ = _load_rank(tmp_path / "int8", 1, 2)  # quantization comes from the manifest
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert all(torch.equal(v, saved[1][k]) for k, v in _bytes(model).items())


def test_gptq_ranks_keep_the_kernel_layout(tmp_path) -> None:
    folder = tmp_path / "gptq"
    write_quantized_checkpoint(hf_model("llama_quant"), folder, Scheme("gptq", 128, sym=False, desc_act=True))
    config = EngineArgs(model=str(folder), device="cpu", tensor_parallel_size=2).create_engine_config()
    saved = _save(config, tmp_path / "sharded")
    original = loader.load_model(config, TensorParallelGroup(rank=0, size=2), CPU)[0]
    model, _ = _load_rank(tmp_path / "sharded", 0, 2)
    assert all(torch.equal(v, saved[0][k]) for k, v in _bytes(model).items())
    for a, b in zip(original.modules(), model.modules()):
        assert getattr(a, "int4_group_size", None) == getattr(b, "int4_group_size", None)
    x = torch.randn(3, 256)
    layer = lambda m: m.model.layers[0].self_attn.qkv_proj  # noqa: E731
    assert torch.equal(layer(original)(x), layer(model)(x))


def test_a_different_tensor_parallel_size_or_dtype_is_refused_naming_both(tiny_checkpoint, tmp_path) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("llama_6h")[0]), device="cpu", tensor_parallel_size=2).create_engine_config()
    _save(config, tmp_path)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2, but tensor_parallel_size=3 was asked for"):
        EngineArgs(model=str(tmp_path), device="cpu", tensor_parallel_size=3).create_engine_config()
    with pytest.raises(ConfigError, match=r"dtype='float32', but dtype='bfloat16'"):
        EngineArgs(model=str(tmp_path), device="cpu", tensor_parallel_size=2, dtype="bfloat16").create_engine_config()
    with pytest.raises(ConfigError, match=r"quantization=None, but quantization='int8'"):
        EngineArgs(model=str(tmp_path), device="cpu", tensor_parallel_size=2, quantization="int8").create_engine_config()
    last = max(tmp_path.glob("model-rank-1-part-*.safetensors"))
    last.unlink()
    with pytest.raises(WeightLoadError, match=rf"lacks {last.name}, rank 1's weights"):
        _load_rank(tmp_path, 1, 2)


def test_a_gguf_models_config_is_written_from_its_metadata(smollm2_gguf, tmp_path) -> None:
    config = EngineArgs(model=str(smollm2_gguf), device="cpu").create_engine_config()
    sharded_state.save_model_files(config, str(tmp_path), {0: 1})
    written = ModelFiles(source="folder", folder=str(tmp_path), weight_format="sharded_state")
    assert model_arch(load_hf_config(written), written) == config.model.arch
