"""A rank's view of the model files: a Hub model its node lacks is fetched there."""

from __future__ import annotations

import msgspec
import pytest

from driver import EngineArgs
from parallel.errors import ModelNotFound
from tests.helpers import make_hub_cache
from workers.worker import ensure_model_files


def test_hub_model_missing_on_this_node_is_resolved_here(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, _ = tiny_checkpoint("llama")
    snapshot = make_hub_cache(tmp_path / "hub", "org/tiny", source)
    config = EngineArgs(model="org/tiny", download_dir=str(tmp_path / "hub"), device="cpu").create_engine_config()
    elsewhere = msgspec.structs.replace(config.model, path="/driver/node/only/snapshot", tokenizer="/driver/node/only/snapshot")
    seen_here = ensure_model_files(msgspec.structs.replace(config, model=elsewhere), rank=1)
    assert seen_here.model.path == str(snapshot) and seen_here.model.tokenizer == str(snapshot)
    assert seen_here.load.weight_files == config.load.weight_files
    assert ensure_model_files(config, rank=0) is config


def test_local_folder_missing_on_this_node(tiny_checkpoint) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cpu").create_engine_config()
    moved = msgspec.structs.replace(config, model=msgspec.structs.replace(config.model, path="/not/on/this/node"))
    with pytest.raises(ModelNotFound, match=r"rank 2 on node .* cannot see '/not/on/this/node'"):
        ensure_model_files(moved, rank=2)
