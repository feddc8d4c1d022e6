"""The contract between a checkpoint and the parameters that load from it.

A checkpoint offers each of its tensors as a `WeightSource`: a name, a file, a full shape and a
`read(index)` that reads only the part of the tensor the index selects. A parameter carries a
`weight_loader(param, source, shard_id)` that decides which slice this rank owns, checks the
and reads exactly that slice (the loading loop has checked the source's shape first); and `full_shapes`, the full
(unsplit) shape the checkpoint should hold for each of its shards. A fused parameter (qkv_proj,
gate_up_proj) has one shard per checkpoint tensor it is filled from; any other has one shard, None.
A loader that reads straight into the parameter's own storage calls `read_final`, which lets a
reader with a load pipeline defer the read.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

import torch

from parallel.errors import WeightLoadError

ShardId = Hashable
Index = tuple[slice, ...]
WeightLoader = Callable[[torch.nn.Parameter, "WeightSource", ShardId], None]


class WeightSource(Protocol):
    """One tensor of a checkpoint, read lazily and by slices."""

    name: str
    """The tensor's name in Hugging Face's convention (`model.layers.0.mlp.up_proj.weight`)."""
    file: str
    """The file it lives in, for error messages."""
    shape: tuple[int, ...]
    """Its full shape."""

    def read(self, index: Index, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read the slice `index` (one `slice` per leading dimension, step 1) from storage.

        With `out` (a tensor of the slice's shape, any dtype or device) the values land there,
        converted, and `out` is returned; readers that can read straight into it do.
        """
        ...


def attach_loader(
    param: torch.nn.Parameter, loader: WeightLoader, full_shapes: dict[ShardId, tuple[int, ...]]
) -> torch.nn.Parameter:
    """Give `param` its weight loader and the full checkpoint shape of each of its shards."""
    param.weight_loader = loader
    param.full_shapes = full_shapes
    return param


def check_shape(param_name: str, source: WeightSource, expected: tuple[int, ...]) -> None:
    """Raise `WeightLoadError` when the checkpoint tensor's shape disagrees with the config."""
    if tuple(source.shape) != tuple(expected):
        raise WeightLoadError(
            f"checkpoint tensor {source.name!r} in {source.file} has shape {tuple(source.shape)}, "
            f"but the model's config makes {param_name} expect {tuple(expected)}; the checkpoint "
            "and its config.json do not belong together"
        )


def read_final(source: WeightSource, index: Index, out: torch.Tensor) -> torch.Tensor:
    """Read the slice `index` into `out`, a parameter's own storage that nothing reads before
    loading ends. A reader with a load pipeline may then queue the read and complete it with the
    others (merged, in file order, on its reader threads); any other reads it at once."""
    final = getattr(source, "read_final", None)
    return source.read(index, out=out) if final is None else final(index, out)


def full_index(ndim: int) -> Index:
    """An index that selects the whole of an `ndim`-dimensional tensor."""
    return tuple(slice(None) for _ in range(ndim))


def replicated_loader(param: torch.nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
    """Every rank holds the whole tensor (norms, biases of row-parallel layers)."""
    read_final(source, full_index(param.dim()), param.data)


def replicated(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Mark `param` as held whole by every rank."""
    return attach_loader(param, replicated_loader, {None: tuple(param.shape)})
