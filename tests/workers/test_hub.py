"""Hub models through the real huggingface_hub client, against a Hub stand-in on the loopback
address (tests/hub_server.py): one format downloaded, starts offline and with the Hub down, one
pinned commit, one fetch per file on a node, and clear errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parallel.errors import ModelNotFound
from tests.hub_server import DroppingListener, HubServer, folder_files
from workers.model_files import find_model
from workers.worker import ensure_model_files

REPO = "org/tiny"


@pytest.fixture
def both_formats(tiny_checkpoint) -> dict[str, bytes]:
    """A sharded safetensors checkpoint (with its index) that also holds a .bin, and a stray shard."""
    files = folder_files(tiny_checkpoint("llama", "sharded")[0])
    files["pytorch_model.bin"] = b"not to be fetched" * 100
    files["stray.safetensors"] = next(v for k, v in files.items() if k.endswith(".safetensors"))
    return files


def fetched(server: HubServer, name: str) -> int:
    return server.count("GET", rf"/resolve/[^/]+/{name}$")


def test_both_formats_download_only_the_indexed_safetensors(hub, both_formats, tmp_path) -> None:
    commit = hub.repos[REPO].push(both_formats)
    files = find_model(REPO, download_dir=str(tmp_path))
    assert files.commit == commit and files.weight_format == "safetensors"
    assert Path(files.folder) == tmp_path / "models--org--tiny" / "snapshots" / commit
    assert fetched(hub, "pytorch_model.bin") == 0 and fetched(hub, "stray.safetensors") == 0
    assert all(fetched(hub, name) == 1 for name in files.weight_files)
    assert (tmp_path / "models--org--tiny" / "refs" / "main").read_text() == commit


def test_offline_start_finds_what_the_download_left(hub, both_formats, tmp_path, monkeypatch) -> None:
    commit = hub.repos[REPO].push(both_formats)
    online = find_model(REPO, download_dir=str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    offline = find_model(REPO, download_dir=str(tmp_path))
    assert (offline.folder, offline.weight_files, offline.commit) == (online.folder, online.weight_files, commit)
    assert len(hub.requests) == before  # nothing asked of the Hub


def test_hub_down_starts_from_the_cache_after_one_try_with_one_warning(hub, both_formats, tmp_path, caplog) -> None:
    """The Hub's port drops every connection: one attempt for the whole start (no retries, no
    backoff), then the cache."""
    commit = hub.repos[REPO].push(both_formats)
    find_model(REPO, download_dir=str(tmp_path))
    hub.stop()
    caplog.set_level(logging.WARNING, logger="shardlm")
    logging.getLogger("shardlm").propagate = True
    try:
        with DroppingListener(hub.port) as down:
            first = find_model(REPO, download_dir=str(tmp_path))
            second = find_model(REPO, download_dir=str(tmp_path))  # the same start's next look-up: no new contact
    finally:
        logging.getLogger("shardlm").propagate = False
    assert first.commit == second.commit == commit
    assert down.attempts == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(REPO in w and commit in w and "cannot be reached" in w for w in warnings)


def test_a_complete_pinned_commit_asks_nothing_of_the_hub(hub, both_formats, tmp_path) -> None:
    commit = hub.repos[REPO].push(both_formats)
    find_model(REPO, download_dir=str(tmp_path))
    before = len(hub.requests)
    assert find_model(REPO, revision=commit, download_dir=str(tmp_path)).commit == commit
    assert len(hub.requests) == before


def test_missing_revision_and_missing_repo_are_named(hub, both_formats, tmp_path) -> None:
    hub.repos[REPO].push(both_formats)
    with pytest.raises(ModelNotFound, match=r"no revision 'v9' of 'org/tiny'"):
        find_model(REPO, revision="v9", download_dir=str(tmp_path))
    with pytest.raises(ModelNotFound, match=r"'org/absent' .*does not exist on the Hugging Face Hub"):
        find_model("org/absent", download_dir=str(tmp_path))


def test_an_incomplete_cached_snapshot_names_the_missing_shard(hub, both_formats, tmp_path, monkeypatch) -> None:
    hub.repos[REPO].push(both_formats)
    files = find_model(REPO, download_dir=str(tmp_path))
    (Path(files.folder) / files.weight_files[-1]).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match=rf"{files.weight_files[-1]}.*shardlm download org/tiny"):
        find_model(REPO, download_dir=str(tmp_path))


def test_uncached_repo_with_the_hub_down(hub, tmp_path) -> None:
    hub.stop()
    with pytest.raises(
        ModelNotFound, match=r"'org/tiny' .*not in the local cache and the Hub cannot be reached .*shardlm download org/tiny"
    ):
        find_model(REPO, download_dir=str(tmp_path))


def test_a_rank_elsewhere_loads_the_drivers_commit_after_the_branch_moved(hub, both_formats, tmp_path, tiny_checkpoint) -> None:
    """A rank on a node without the snapshot (its own cache) fetches the commit the driver
    resolved, not the commit the branch points at by then."""
    from driver.config.args import EngineArgs

    first = hub.repos[REPO].push(both_formats)
    config = EngineArgs(model=REPO, download_dir=str(tmp_path / "driver"), device="cpu").create_engine_config()
    assert config.model.commit == first
    hub.repos[REPO].push(folder_files(tiny_checkpoint("qwen2")[0]))  # someone pushes to main
    elsewhere = config.__class__(
        model=config.model.__class__(**{**_fields(config.model), "path": str(tmp_path / "not-on-this-node")}),
        load=config.load.__class__(**{**_fields(config.load), "download_dir": str(tmp_path / "other-node")}),
        cache=config.cache,
        parallel=config.parallel,
        scheduler=config.scheduler,
    )
    found = ensure_model_files(elsewhere, rank=1)
    assert Path(found.model.path) == tmp_path / "other-node" / "models--org--tiny" / "snapshots" / first
    assert hub.count("GET", r"/revision/main$") == 1  # only the driver resolved the branch


def _fields(struct) -> dict:
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


FETCH = textwrap.dedent("""
    import sys
    from workers.model_files import find_model
    print(find_model("org/tiny", download_dir=sys.argv[1]).commit)
""")


def test_two_processes_on_one_node_fetch_each_file_once(hub, both_formats, tmp_path) -> None:
    commit = hub.repos[REPO].push(both_formats)
    env = {**__import__("os").environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].strip() for o in outs] == [commit, commit], [o[1][-2000:] for o in outs]
    names = [n for n in both_formats if n not in ("pytorch_model.bin", "stray.safetensors")]
    assert all(fetched(hub, name) <= 1 for name in names)
    assert all(fetched(hub, name) == 1 for name in names if name.endswith(".safetensors"))
