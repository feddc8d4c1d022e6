"""The strict loading loop: every weight loaded once, every checkpoint tensor used, shapes checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from driver.config.args import EngineArgs
from parallel.errors import WeightLoadError
from parallel.state import TensorParallelGroup
from workers.loader import DummySource, checkpoint_name, checkpoint_target, load_model
from workers.models.llama import LlamaForCausalLM
from workers.worker import Worker

MAPPING = LlamaForCausalLM.packed_modules_mapping


def _copy_with(folder: Path, dest: Path, edit) -> Path:
    """A copy of a one-file safetensors checkpoint whose tensors `edit` changed."""
    shutil.copytree(folder, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    return dest


def _load(folder: Path) -> None:
    Worker(EngineArgs(model=str(folder), device="cpu").create_engine_config()).load_model()


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path) -> None:
    folder = _copy_with(tiny_checkpoint("llama")[0], tmp_path / "c", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"not in the checkpoint: model\.layers\.1\.self_attn\.k_proj\.weight"):
        _load(folder)


def test_unknown_tensor_is_named_with_its_file(tiny_checkpoint, tmp_path) -> None:
    folder = _copy_with(tiny_checkpoint("llama")[0], tmp_path / "c", lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(WeightLoadError, match=r"match no weight of the model: model\.extra\.weight \(in .*model\.safetensors\)"):
        _load(folder)


def test_known_extras_are_skipped_unread(tiny_checkpoint, tmp_path) -> None:
    folder = _copy_with(
        tiny_checkpoint("llama_tied")[0],
        tmp_path / "c",
        lambda t: t.update(
            {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "lm_head.weight": torch.ones(300, 64)}
        ),
    )
    worker = Worker(EngineArgs(model=str(folder), device="cpu").create_engine_config())
    report = worker.load_model()
    assert report.bytes_read == report.checkpoint_bytes - 8 * 4 - 300 * 64 * 4


def test_shape_mismatch_names_tensor_file_and_both_shapes(tiny_checkpoint, tmp_path) -> None:
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :90].contiguous()

    folder = _copy_with(tiny_checkpoint("llama")[0], tmp_path / "c", shrink)
    with pytest.raises(WeightLoadError) as info:
        _load(folder)
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj.weight" in message and "model.safetensors" in message
    assert "(64, 90)" in message and "(64, 96)" in message


def test_tensor_in_two_shards_is_an_error(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "c"
    shutil.copytree(tiny_checkpoint("llama", "sharded")[0], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    extra = load_file(folder / first)
    extra.update(load_file(folder / second))
    save_file(extra, folder / second)
    with pytest.raises(WeightLoadError, match="appears twice"):
        _load(folder)


def test_name_mapping_round_trips() -> None:
    assert checkpoint_target("model.layers.3.self_attn.k_proj.weight", MAPPING) == (
        "model.layers.3.self_attn.qkv_proj.weight",
        "k",
    )
    assert checkpoint_target("model.layers.3.mlp.up_proj.weight", MAPPING) == ("model.layers.3.mlp.gate_up_proj.weight", 1)
    assert checkpoint_target("model.norm.weight", MAPPING) == ("model.norm.weight", None)
    for name in ("model.layers.0.self_attn.v_proj.bias", "model.layers.2.mlp.gate_proj.weight", "lm_head.weight"):
        assert checkpoint_name(*checkpoint_target(name, MAPPING), MAPPING) == name


@pytest.mark.parametrize("rows", [(0, 300), (0, 1), (255, 257), (100, 300), (256, 512)])
def test_dummy_source_slices_agree_with_the_whole(rows) -> None:
    source = DummySource("model.embed_tokens.weight", (600, 16), seed=1)
    whole = source.read((slice(None),))
    part = source.read((slice(*rows), slice(4, 12)))
    assert torch.equal(part, whole[rows[0] : rows[1], 4:12])


def test_dummy_weights_are_the_same_at_every_tensor_parallel_size(tiny_checkpoint) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("llama")[0]), load_format="dummy", device="cpu").create_engine_config()
    whole, _ = load_model(config, TensorParallelGroup.single(), torch.device("cpu"))
    full = whole.model.layers[0].mlp.down_proj.weight
    pieces = [
        load_model(config, TensorParallelGroup(rank=r, size=2), torch.device("cpu"))[0].model.layers[0].mlp.down_proj.weight
        for r in range(2)
    ]
    assert torch.equal(torch.cat(pieces, dim=1), full)
