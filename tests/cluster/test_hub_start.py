"""Engine starts of a Hub model against the loopback Hub stand-in: every rank loads the commit
the driver resolved though the branch moves at once, the tokenizer comes from the same
snapshot, and a start with the Hub down or offline takes what `shardlm download` left."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from driver import LLM, SamplingParams
from tests.helpers import with_byte_tokenizer
from tests.hub_server import DroppingListener, folder_files

REPO = "org/tiny-text"
SMALL = dict(max_num_batched_tokens=256, kv_cache_memory_bytes=4 * 2**20, device="cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Two commits' files: a tiny Llama with a byte tokenizer, then a tiny Qwen2 with it."""
    root = tmp_path_factory.mktemp("hub-start")
    first = with_byte_tokenizer(tiny_checkpoint("llama")[0], root / "llama")
    second = with_byte_tokenizer(tiny_checkpoint("qwen2")[0], root / "qwen2")
    return folder_files(first), folder_files(second)


def test_every_rank_loads_the_drivers_commit_though_the_branch_moves(ray_cluster, hub, checkpoints, tmp_path) -> None:
    repo = hub.repos[REPO]
    first = repo.push(checkpoints[0])

    def push_after_resolving(repo_id: str, revision: str) -> None:
        if revision == "main" and repo.refs["main"] == first:
            repo.push(checkpoints[1])  # someone pushes to main just after the driver asked

    hub.on_revision = push_after_resolving
    with LLM(REPO, download_dir=str(tmp_path), tensor_parallel_size=2, **SMALL) as llm:
        assert repo.refs["main"] != first  # the branch did move
        assert [r.commit for r in llm.load_report.ranks] == [first, first]
        text = llm.generate(["ab"], GREEDY, use_tqdm=False)[0].outputs[0].text  # the snapshot's own tokenizer
        assert isinstance(text, str) and len(llm.generate(["ab"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 4
    assert hub.count("GET", r"/revision/main$") == 1
    assert not (tmp_path / "models--org--tiny-text" / "snapshots" / repo.refs["main"]).exists()


def test_download_then_starts_offline_and_with_the_hub_down(ray_cluster, hub, checkpoints, tmp_path, monkeypatch, caplog) -> None:
    from driver.entrypoints.cli import main

    commit = hub.repos[REPO].push(checkpoints[0])
    assert main(["download", REPO, "--download-dir", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "models--org--tiny-text" / "refs" / "main").read_text() == commit

    with LLM(REPO, download_dir=str(tmp_path), **SMALL) as llm:
        online = llm.generate(["ab"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    hub.stop()
    caplog.set_level(logging.WARNING, logger="shardlm")
    with DroppingListener(hub.port) as down, LLM(REPO, download_dir=str(tmp_path), **SMALL) as llm:
        assert llm.generate(["ab"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == online
        assert [r.commit for r in llm.load_report.ranks] == [commit]
    assert down.attempts == 1  # the whole start, driver and rank: one try, no retries or backoff
    warnings = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1 and REPO in warnings[0] and commit in warnings[0]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with LLM(REPO, download_dir=str(tmp_path), **SMALL) as llm:
        assert llm.generate(["ab"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == online
    assert Path(llm.config.model.path).name == commit
