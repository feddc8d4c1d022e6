"""Build a model on the meta device and materialise it by loading only this rank's slices.

One loop: each checkpoint tensor is mapped to a parameter (and a shard of it, for fused
parameters), its shape is checked against the config, and the parameter's own `weight_loader`
reads its slice. Afterwards a strict check names every parameter never loaded and every
checkpoint tensor never used.
"""

from __future__ import annotations

import os
import resource
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch
from torch import nn

from parallel.errors import WeightLoadError
from parallel.state import TensorParallelGroup
from parallel.weights import Index, ShardId, WeightSource, check_shape
from workers import sharded_state
from workers.checkpoint import ReadStats, checkpoint_tensor_bytes, iter_checkpoint
from workers.config import EngineConfig
from workers.load_pipeline import LoadPipeline, choose_for_files
from workers.models import model_class
from workers.packed_weights import pack_linear_weights
from workers.param_memory import empty_like_all
from workers.progress import ProgressTracker

ParamKey = tuple[str, ShardId]


class WeightLoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """What loading the weights cost one rank."""

    rank: int
    world_size: int
    load_format: str
    bytes_read: int
    """Bytes copied from checkpoint files (0 for dummy weights)."""
    pages_touched: int
    """Distinct 4 KiB file pages covered by the bytes read: the storage the rank touched."""
    tensors_read: int
    checkpoint_bytes: int
    """All tensor bytes in the checkpoint, for comparison with bytes_read."""
    seconds: float
    peak_host_bytes: int
    """The process's peak resident memory so far (ru_maxrss), loading included."""
    weight_device_bytes: int
    """Memory the rank's parameters take on its device."""
    packed_bytes: int = 0
    """On CPU, the oneDNN copies of the larger linear weights, beside them (`workers.packed_weights`)."""
    load_strategy: str = ""
    """How the files were read: "page_cache" or "direct" ("" where nothing was read through the pipeline)."""
    load_strategy_reason: str = ""
    load_threads: int = 0
    """Reader threads of the load pipeline."""
    reads: int = 0
    """Read calls the pipeline issued, after merging adjacent spans."""
    commit: str | None = None
    """For a Hub model: the commit of the snapshot this rank read (its folder's name in the cache)."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def build_on_meta(config: EngineConfig, tp: TensorParallelGroup) -> nn.Module:
    """This rank's model on the meta device: every parameter's shape and dtype, no memory."""
    model_cfg = config.model
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, model_cfg.dtype))
    try:
        with torch.device("meta"):
            return model_class(model_cfg.arch.architecture)(model_cfg.arch, tp, model_cfg.max_model_len, model_cfg.quantization)
    finally:
        torch.set_default_dtype(previous)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (a shared parameter counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_model(config: EngineConfig, tp: TensorParallelGroup, device: torch.device, final_layout: bool = False) -> nn.Module:
    """The model with uninitialised parameters on `device` and its computed buffers filled in;
    with `final_layout`, the parameters are those it computes with after loading (what a
    sharded_state checkpoint holds) rather than those the checkpoint's tensors fill."""
    model = build_on_meta(config, tp)
    if final_layout:
        process_weights_after_loading(model)
    materialize(model, device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    return model.eval()


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device`
    (`workers.param_memory`: on CPU, one arena in huge pages).

    Unlike `Module.to_empty`, a parameter keeps its attributes (`weight_loader`, `full_shapes`)
    and a parameter shared by two modules (tied embeddings) stays one parameter.
    """
    unique = {id(p): p for m in model.modules() for p in m._parameters.values() if p is not None}
    storage = dict(zip(unique, empty_like_all(list(unique.values()), device)))
    new_params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in new_params:
                fresh = nn.Parameter(storage[id(param)], requires_grad=False)
                fresh.__dict__.update(param.__dict__)
                new_params[id(param)] = fresh
            module._parameters[name] = new_params[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)


def load_model(
    config: EngineConfig, tp: TensorParallelGroup, device: torch.device, progress: ProgressTracker | None = None
) -> tuple[nn.Module, WeightLoadReport]:
    """Build the model and fill it from the checkpoint (or with dummy weights); report the cost
    (and, with `progress`, count the tensors loaded as it goes)."""
    start = time.perf_counter()
    load = config.load
    sharded = load.load_format == "sharded_state"
    model = build_model(config, tp, device, final_layout=sharded)
    stats = ReadStats()
    pipeline = None
    if load.load_format == "dummy":
        sources: Iterable[WeightSource] = dummy_sources(model, config.model.seed)
        total = 0
    elif sharded:
        parts = sharded_state.read_manifest(Path(config.model.path)).parts.get(str(tp.rank))
        files = sharded_state.rank_files(load.weight_files, tp.rank, config.model.path, parts)
        pipeline = make_pipeline(config, device, files)
        sources = sharded_state.iter_rank_sources(config.model.path, files, stats, pipeline)
        total = sharded_state.rank_tensor_bytes(config.model.path, files)
    else:
        pipeline = make_pipeline(config, device)
        sources = iter_checkpoint(config.model.path, load.weight_files, load.load_format, stats, pipeline)
        total = checkpoint_tensor_bytes(config.model.path, load.weight_files, load.load_format)
    if progress is not None:
        sources = progress.track(model, sources, stats, len(dict(model.named_parameters())) if sharded else None)
    try:
        with torch.no_grad():
            if sharded:
                sharded_state.load_rank(model, sources)
            else:
                load_weights(model, sources)
            done = pipeline.finish() if pipeline is not None else None
            if sharded:
                restore_after_loading(model)
            else:
                process_weights_after_loading(model)
            packed = pack_linear_weights(model) if device.type == "cpu" else 0
    except BaseException:
        if pipeline is not None:
            pipeline.close()
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report = WeightLoadReport(
        rank=tp.rank,
        world_size=tp.size,
        load_format=load.load_format,
        bytes_read=stats.bytes_read,
        pages_touched=stats.pages_touched(),
        tensors_read=len(stats.tensors),
        checkpoint_bytes=total,
        seconds=time.perf_counter() - start,
        peak_host_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        weight_device_bytes=parameter_bytes(model),
        packed_bytes=packed,
        load_strategy=done.strategy if done else "",
        load_strategy_reason=done.reason if done else "",
        load_threads=done.threads if done else 0,
        reads=done.reads if done else 0,
        commit=Path(config.model.path).name if config.model.source == "hub" else None,
    )
    return model, report


def make_pipeline(config: EngineConfig, device: torch.device, files: Iterable[str] | None = None) -> LoadPipeline:
    """The rank's load pipeline, its read strategy chosen from the safetensors files it will read
    (`files`, default: all the checkpoint's)."""
    load = config.load
    names = load.weight_files if files is None else tuple(files)
    safetensors = load.load_format in ("safetensors", "sharded_state")
    paths = [os.path.join(config.model.path, f) for f in names] if safetensors else []
    return LoadPipeline(device, threads=load.threads, strategy=choose_for_files(load.strategy, paths))


def restore_after_loading(model: nn.Module) -> None:
    """What layers derive from their final parameters' values once a sharded_state load filled them."""
    for module in model.modules():
        if hasattr(module, "restore_after_loading"):
            module.restore_after_loading()


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer turn what it read into what it computes with (4-bit layouts); on the meta
    device this gives the final parameters' shapes, for the planner."""
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def checkpoint_target(name: str, mapping: dict[str, tuple[str, ShardId]]) -> ParamKey:
    """The parameter and shard a checkpoint tensor fills: `...q_proj.weight` -> (`...qkv_proj.weight`, "q")."""
    for original, (fused, shard_id) in mapping.items():
        if f".{original}." in name:
            return name.replace(f".{original}.", f".{fused}."), shard_id
    return name, None


def checkpoint_name(param_name: str, shard_id: ShardId, mapping: dict[str, tuple[str, ShardId]]) -> str:
    """The inverse of `checkpoint_target`: the checkpoint tensor that fills a parameter's shard."""
    for original, (fused, fused_shard) in mapping.items():
        if fused_shard == shard_id and f".{fused}." in param_name:
            return param_name.replace(f".{fused}.", f".{original}.")
    return param_name


def load_weights(model: nn.Module, sources: Iterable[WeightSource]) -> None:
    """Fill every parameter from `sources`; raise `WeightLoadError` naming what does not fit."""
    params = dict(model.named_parameters())
    mapping = getattr(model, "packed_modules_mapping", {})
    ignored = model.ignored_checkpoint_tensors()
    loaded: dict[ParamKey, str] = {}
    unused: list[str] = []
    for source in sources:
        key = checkpoint_target(source.name, mapping)
        param = params.get(key[0])
        if param is None or key[1] not in param.full_shapes:
            if not any(p.search(source.name) for p in ignored):
                unused.append(f"{source.name} (in {source.file})")
            continue
        if key in loaded:
            raise WeightLoadError(f"checkpoint tensor {source.name!r} appears twice: in {loaded[key]} and in {source.file}")
        check_shape(key[0], source, param.full_shapes[key[1]])
        param.weight_loader(param, source, key[1])
        loaded[key] = source.file
    _check_complete(params, loaded, unused, mapping)


def _check_complete(params: dict[str, nn.Parameter], loaded: dict, unused: list[str], mapping: dict) -> None:
    missing = [
        checkpoint_name(name, shard, mapping)
        for name, param in params.items()
        for shard in param.full_shapes
        if (name, shard) not in loaded
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights the model needs are not in the checkpoint: {_few(missing)}")
    if unused:
        problems.append(f"{len(unused)} checkpoint tensors match no weight of the model: {_few(unused)}")
    if problems:
        raise WeightLoadError("; ".join(problems) + ". Check that the checkpoint's files and its config.json belong together")


def _few(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass
class DummySource:
    """A deterministic random tensor, generated in blocks of rows seeded by (seed, name, block).

    The same name gives the same values whatever slice is read, so every tensor-parallel size
    sees the same model; nothing is read from disk.
    """

    name: str
    shape: tuple[int, ...]
    seed: int
    file: str = "<dummy weights>"
    rows_per_block: int = 256

    def read(self, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        values = self._generate(index)
        return values if out is None else out.copy_(values)

    def _generate(self, index: Index) -> torch.Tensor:
        rows = index[0].indices(self.shape[0])
        first, last = rows[0] // self.rows_per_block, -(-rows[1] // self.rows_per_block)
        blocks = torch.cat([self._block(b) for b in range(first, last)]) if last > first else torch.empty(0, *self.shape[1:])
        offset = first * self.rows_per_block
        return blocks[(slice(rows[0] - offset, rows[1] - offset), *index[1:])]

    def _block(self, block: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.name}:{block}".encode()))
        start = block * self.rows_per_block
        count = min(self.rows_per_block, self.shape[0] - start)
        return torch.empty(count, *self.shape[1:]).uniform_(-0.05, 0.05, generator=generator)


def dummy_sources(model: nn.Module, seed: int) -> Iterator[DummySource]:
    """One dummy tensor for every checkpoint tensor the model expects."""
    mapping = getattr(model, "packed_modules_mapping", {})
    for name, param in model.named_parameters():
        for shard_id, shape in param.full_shapes.items():
            yield DummySource(checkpoint_name(name, shard_id, mapping), shape, seed)
