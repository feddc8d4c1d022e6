"""Pre-sharded checkpoints (vLLM's `sharded_state` layout): each rank's final tensors in its own files.

A folder holds `model-rank-{rank}-part-{part}.safetensors` for every rank, beside the model's
config and tokenizer files and a manifest (`shardlm_sharded_state.json`) that records the
tensor-parallel size, dtype and quantization the tensors were made with. The tensors are the
parameters exactly as a rank computes with them, after slicing and quantizing, so loading them
is a plain read of each parameter through the load pipeline: no slicing, no exchange between
ranks, no quantization. Rank r opens only its own files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import torch
from torch import nn

from parallel.errors import ConfigError, WeightLoadError
from parallel.weights import full_index, read_final
from workers.config import EngineConfig
from workers.load_pipeline import byte_view
from workers.model_files import META_PATTERNS
from workers.read_stats import ReadStats
from workers.safetensors_file import DTYPES, SafetensorsSource, iter_safetensors, tensor_bytes

MANIFEST = "shardlm_sharded_state.json"
PART_PATTERN = re.compile(r"^model-rank-(\d+)-part-(\d+)\.safetensors$")
MAX_PART_BYTES = 5 * 2**30
SAFETENSORS_DTYPES = {dtype: name for name, dtype in DTYPES.items()}


class ShardedManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a sharded_state folder was saved with; a load must match it."""

    tensor_parallel_size: int
    dtype: str
    quantization: str | None = None
    """The `quantization=` the tensors were made with (None: the model dtype, or the checkpoint's own)."""
    parts: dict[str, int] = {}
    """Files per rank, by rank ("0", "1", ...)."""


def part_name(rank: int, part: int) -> str:
    return f"model-rank-{rank}-part-{part}.safetensors"


def is_sharded_state(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or any(PART_PATTERN.match(p.name) for p in folder.glob("model-rank-*.safetensors"))


def sharded_files(folder: Path) -> tuple[str, ...]:
    """Every rank's part files in the folder, by rank and part."""
    found = [(int(m[1]), int(m[2]), m[0]) for p in folder.iterdir() if (m := PART_PATTERN.match(p.name))]
    return tuple(name for _, _, name in sorted(found))


def read_manifest(folder: Path) -> ShardedManifest:
    path = folder / MANIFEST
    try:
        return msgspec.json.decode(path.read_bytes(), type=ShardedManifest)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{folder} holds model-rank-*-part-*.safetensors files but no {MANIFEST}; save it again with "
            "llm.save_sharded_state(path) or `shardlm save-sharded`"
        ) from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path} is not a shardlm sharded_state manifest: {exc}") from exc


def write_manifest(folder: Path, manifest: ShardedManifest) -> None:
    (folder / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))


def rank_files(files: tuple[str, ...], rank: int, folder: str, manifest_parts: int | None = None) -> list[str]:
    """Rank `rank`'s part files, in order; a missing one is a `WeightLoadError` that names it."""
    mine = sorted((int(m[2]), f) for f in files if (m := PART_PATTERN.match(f)) and int(m[1]) == rank)
    expected = manifest_parts if manifest_parts is not None else (max(p for p, _ in mine) + 1 if mine else 1)
    have = {p for p, _ in mine}
    missing = [part_name(rank, p) for p in range(expected) if p not in have]
    if missing:
        raise WeightLoadError(
            f"sharded_state folder {folder} lacks {', '.join(missing)}, rank {rank}'s weights; save the "
            "model again with the same tensor_parallel_size"
        )
    return [f for _, f in mine]


# -- writing ------------------------------------------------------------------------------------


def rank_tensor_bytes(folder: str, files: list[str]) -> int:
    return sum(tensor_bytes(os.path.join(folder, f)) for f in files)


def final_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a rank computes with, by name (a tied parameter once)."""
    return {name: p.data for name, p in model.named_parameters()}


def save_rank(model: nn.Module, rank: int, folder: str, max_part_bytes: int = MAX_PART_BYTES) -> list[str]:
    """Write this rank's final tensors as `model-rank-{rank}-part-*.safetensors`; the file names."""
    os.makedirs(folder, exist_ok=True)
    tensors = final_tensors(model)
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if parts[-1] and size + nbytes > max_part_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += nbytes
    names = []
    for part, chunk in enumerate(parts):
        names.append(part_name(rank, part))
        write_safetensors(os.path.join(folder, names[-1]), chunk)
    return names


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file of `tensors` (any device), streamed to disk one tensor at a time.

    shardlm's own writer: CPU parameters live in one arena (`workers.param_memory`), and
    safetensors' `save_file` refuses tensors that share a storage.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise WeightLoadError(f"cannot save {name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.numel():
                f.write(byte_view(t.detach().to("cpu").contiguous()))
    os.replace(tmp, path)


def save_model_files(config: EngineConfig, folder: str, parts: dict[int, int]) -> None:
    """Beside the rank files: the model's config (a GGUF model's written from its metadata), its
    other small files (generation config, chat template, tokenizer files of a folder model) and
    the manifest. A weight index is not copied: the rank files replace the weights."""
    model, out = config.model, Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if model.gguf_file is not None:
        from workers.gguf_file import gguf_model_config, read_gguf_index

        hf = gguf_model_config(read_gguf_index(os.path.join(model.path, model.gguf_file)))
        hf["architectures"] = [model.arch.architecture]
        (out / "config.json").write_text(json.dumps(hf, indent=2))
    elif Path(model.path).resolve() != out.resolve():
        for path in Path(model.path).iterdir():
            if path.is_file() and _is_model_file(path.name):
                shutil.copyfile(path, out / path.name)
    quant = model.quantization.method if model.quantization is not None else None
    write_manifest(
        out,
        ShardedManifest(
            tensor_parallel_size=config.parallel.tensor_parallel_size,
            dtype=model.dtype,
            quantization=quant,
            parts={str(rank): n for rank, n in sorted(parts.items())},
        ),
    )


def _is_model_file(name: str) -> bool:
    if name.endswith(".index.json") or name == MANIFEST or PART_PATTERN.match(name):
        return False
    return any(fnmatch.fnmatch(name, pattern) for pattern in META_PATTERNS)


# -- reading ------------------------------------------------------------------------------------


def iter_rank_sources(folder: str, files: list[str], stats: ReadStats, pipeline: Any) -> Iterator[SafetensorsSource]:
    for file in files:
        yield from iter_safetensors(os.path.join(folder, file), stats, pipeline)


def load_rank(model: nn.Module, sources: Iterable[SafetensorsSource]) -> None:
    """Fill every parameter of `model` (built in its final layout) from this rank's tensors, each
    read whole into its parameter; names, shapes and dtypes must match exactly."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unknown: list[str] = []
    for source in sources:
        param = params.get(source.name)
        if param is None:
            unknown.append(f"{source.name} (in {source.file})")
            continue
        if tuple(source.shape) != tuple(param.shape) or source.dtype != param.dtype:
            raise WeightLoadError(
                f"{source.name} in {source.file} is {source.dtype} {tuple(source.shape)}, but this engine's rank "
                f"holds it as {param.dtype} {tuple(param.shape)}: load it with the dtype, quantization and "
                "tensor_parallel_size it was saved with"
            )
        read_final(source, full_index(param.dim()), param.data)
        loaded.add(source.name)
    missing = sorted(set(params) - loaded)
    problems = [f"missing {', '.join(missing[:8])}" if missing else "", f"unknown {', '.join(unknown[:8])}" if unknown else ""]
    if missing or unknown:
        raise WeightLoadError(
            "this rank's sharded_state files do not match the model (" + "; ".join(p for p in problems if p) + "): "
            "load them with the dtype, quantization and tensor_parallel_size they were saved with"
        )
