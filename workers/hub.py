"""Hugging Face repo ids: one resolution to a commit, downloads of just what a start needs, and
starts from the cache when the Hub is offline or cannot be reached.

A start contacts the Hub at most once per process and repo (`repo_info` at the revision, with a
short connect timeout and no retries). It answers the commit and the file list; the snapshot of
that commit is fetched where it is not complete in the cache. A commit hash given as the
revision whose snapshot is complete needs no contact at all: that is how the ranks load the
commit the driver resolved, on any node, without re-resolving a branch that may have moved.

Offline (HF_HUB_OFFLINE) or with the Hub unreachable, the cache answers: `refs/<revision>` (or
the commit hash itself) names a snapshot, accepted when it holds config.json and one complete
weight format (every shard an index names).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec

from parallel.errors import ModelNotFound

logger = logging.getLogger(f"shardlm.{__name__}")

COMMIT = re.compile(r"[0-9a-f]{40}")
CONNECT_TIMEOUT_S = 5.0
"""How long the one contact with the Hub may take to connect before the cache is used instead."""
READ_TIMEOUT_S = 30.0
UNREACHABLE_MEMORY_S = 300.0
"""After a failed contact, this process uses the cache for this long without trying again."""

_unreachable: dict[str, tuple[float, str]] = {}
"""Hub endpoint -> (when it failed, why): the rest of a start goes to the cache at once."""
_warned: set[tuple[str, ...]] = set()


def warn_once(key: tuple[str, ...], message: str) -> None:
    """Log `message` as a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", message)


class HubSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot folder of a repo at one commit, and how it was found."""

    repo_id: str
    commit: str
    folder: str
    from_cache: bool
    """True when the Hub was not contacted, or could not be."""


def is_commit(revision: str | None) -> bool:
    return bool(revision) and COMMIT.fullmatch(revision) is not None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub reads it at import), else the Hub's own."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def cache_root(download_dir: str | None) -> Path:
    from huggingface_hub import constants

    return Path(download_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def repo_folder(repo_id: str, download_dir: str | None) -> Path:
    return cache_root(download_dir) / f"models--{repo_id.replace('/', '--')}"


def describe(repo_id: str, revision: str | None, download_dir: str | None) -> str:
    return f"model {repo_id!r} (revision {revision or 'main'}, cache {cache_root(download_dir)})"


# ----------------------------------------------------------------------------------------------
# The cache


def cached_commit(repo_id: str, revision: str | None, download_dir: str | None) -> str | None:
    """The commit the cache records for `revision` (a commit hash answers itself)."""
    if is_commit(revision):
        return revision
    ref = repo_folder(repo_id, download_dir) / "refs" / (revision or "main")
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if is_commit(commit) else None


def record_ref(repo_id: str, revision: str | None, commit: str, download_dir: str | None) -> None:
    """Write refs/<revision> -> commit atomically, so that a later offline start finds it."""
    if is_commit(revision):
        return
    ref = repo_folder(repo_id, download_dir) / "refs" / (revision or "main")
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def snapshot_folder(repo_id: str, commit: str, download_dir: str | None) -> Path:
    return repo_folder(repo_id, download_dir) / "snapshots" / commit


def missing_files(folder: Path, names: list[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def from_cache(repo_id: str, revision: str | None, download_dir: str | None, why: str) -> HubSnapshot:
    """The cached snapshot of `revision`; `ModelNotFound` saying what the cache lacks and why
    the Hub was not asked (`why`)."""
    where = describe(repo_id, revision, download_dir)
    fix = f"run `shardlm download {repo_id}{revision_flag(revision)}` where the Hub can be reached, or pass a local folder"
    repo = repo_folder(repo_id, download_dir)
    if not repo.is_dir():
        raise ModelNotFound(f"{where} is not in the local cache and the Hub cannot be reached ({why}): {fix}")
    commit = cached_commit(repo_id, revision, download_dir)
    if commit is None:
        known = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
        raise ModelNotFound(
            f"{where}: the cache records no commit for revision {revision or 'main'} (its refs: "
            f"{', '.join(known) or 'none'}) and the Hub cannot be reached ({why}): pass --revision with a "
            f"cached ref or commit, or {fix}"
        )
    folder = snapshot_folder(repo_id, commit, download_dir)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(
            f"{where}: the cached snapshot of commit {commit} has no config.json and the Hub cannot be reached ({why}): {fix}"
        )
    return HubSnapshot(repo_id=repo_id, commit=commit, folder=str(folder), from_cache=True)


def revision_flag(revision: str | None) -> str:
    """` --revision R` for a command to suggest ("" for main)."""
    return f" --revision {revision}" if revision else ""


# ----------------------------------------------------------------------------------------------
# The Hub


class HubUnreachable(Exception):
    """The Hub did not answer (connection refused, timeout, DNS, a 5xx)."""


def _timeout() -> Any:
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub before its httpx2 client: a plain number
        return READ_TIMEOUT_S
    return httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)


def repo_info(repo_id: str, revision: str | None, download_dir: str | None) -> tuple[str, list[str]]:
    """(commit, file names) of `repo_id` at `revision`, from one request to the Hub.

    Raises `ModelNotFound` for a repo or revision the Hub does not have, and `HubUnreachable`
    when it cannot be asked (remembered, so the rest of this process's start goes to the cache).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = hub_endpoint()
    failed = _unreachable.get(endpoint)
    if failed is not None and time.monotonic() - failed[0] < UNREACHABLE_MEMORY_S:
        raise HubUnreachable(failed[1])
    where = describe(repo_id, revision, download_dir)
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision or "main", timeout=_timeout())
    except RevisionNotFoundError as exc:
        raise ModelNotFound(
            f"{where}: the Hub has no revision {revision!r} of {repo_id!r}; check the branch, tag or commit"
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFound(
            f"{where} does not exist on the Hugging Face Hub or needs access: check the name, and HF_TOKEN for a "
            f"private or gated repo ({type(exc).__name__})"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
        if status and status < 500 and status != 429:
            raise ModelNotFound(f"{where} could not be fetched: the Hub answered {status}: {exc}") from exc
        raise _remember(endpoint, f"the Hub at {endpoint} answered {status or 'an error'}") from exc
    except Exception as exc:  # noqa: BLE001  connection refused, timeout, DNS: the cache may do
        raise _remember(endpoint, f"{endpoint} cannot be reached: {type(exc).__name__}: {exc}") from exc
    if not info.sha:
        raise ModelNotFound(f"{where}: the Hub's answer names no commit")
    return info.sha, sorted(s.rfilename for s in info.siblings or ())


def _remember(endpoint: str, why: str) -> HubUnreachable:
    _unreachable[endpoint] = (time.monotonic(), why)
    return HubUnreachable(why)


def fetch(repo_id: str, commit: str, names: list[str], download_dir: str | None) -> Path:
    """Download `names` of `repo_id` at `commit` into the cache (what is there already is kept)."""
    from huggingface_hub import snapshot_download

    folder = snapshot_folder(repo_id, commit, download_dir)
    if not missing_files(folder, names):
        return folder
    return Path(
        snapshot_download(
            repo_id,
            revision=commit,
            cache_dir=str(cache_root(download_dir)),
            allow_patterns=names,
            endpoint=hub_endpoint(),
            etag_timeout=CONNECT_TIMEOUT_S,
        )
    )


def fetch_file(repo_id: str, commit: str, name: str, download_dir: str | None) -> Path:
    """One file of `repo_id` at `commit` (an index, read to choose the shards)."""
    from huggingface_hub import hf_hub_download

    cached = snapshot_folder(repo_id, commit, download_dir) / name
    if cached.is_file():
        return cached
    return Path(
        hf_hub_download(
            repo_id,
            name,
            revision=commit,
            cache_dir=str(cache_root(download_dir)),
            endpoint=hub_endpoint(),
            etag_timeout=CONNECT_TIMEOUT_S,
        )
    )
