"""How a tensor-parallel linear layer holds and multiplies its weight: in the model dtype,
quantized while loading (FP8, int8), or read already quantized (GPTQ, AWQ 4-bit).

A linear layer (`parallel.layers`) owns the partition: which output rows of each checkpoint tensor
this rank holds (`out_shards`) and which input columns (`in_start`, `in_stop`). A `LinearMethod`
owns the storage: it creates the layer's parameters, each with a weight loader that reads this
rank's slice through the layer, and computes X A^T for the rank's slice.

Online quantization (weight only, a scale per output channel): a rank reads one shard of its slice
in the model dtype into a temporary tensor, quantizes it and keeps only the quantized values and
scales, so the full-precision slice lives no longer than that shard's load.

4-bit checkpoints store, per linear layer, `qweight` (eight 4-bit values per int32), `scales` and
`qzeros` per group of `group_size` input rows, and for GPTQ `g_idx` (each input row's group):
- GPTQ (AutoGPTQ): qweight [K/8, N] packed along the inputs, nibble i of word r holding row 8r+i;
  qzeros [G, N/8] packed along the outputs, holding zero - 1 (format "gptq"; "gptq_v2" holds zero).
- AWQ (AutoAWQ, GEMM): qweight [K, N/8] and qzeros [G, N/8] packed along the outputs, nibble i of
  word c holding column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; no g_idx (row k is in group k // group_size).
Both dequantize as W[n, k] = (q[k, n] - zero[g, n]) * scale[g, n] with g the row's group. After
loading, each layer converts its slices to the one layout the 4-bit kernel takes
(`kernels.int4_linear`). Column-parallel slices cut the outputs at multiples of 8; row-parallel
slices cut the inputs at group boundaries (with act-order, every rank keeps all groups' scales).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import torch
from torch import nn

from kernels import onednn_linear
from parallel.errors import ConfigError, WeightLoadError
from parallel.weights import ShardId, WeightSource, attach_loader

if TYPE_CHECKING:
    from parallel.layers import ParallelLinear

QUANTIZATION_METHODS = ("fp8", "int8", "gptq", "awq")
"""What `quantization=` accepts: fp8 and int8 quantize while loading; gptq and awq read 4-bit checkpoints."""
ONLINE = ("fp8", "int8")
PACK = 8
"""4-bit values per int32 word."""
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ's packing order: nibble i of a word holds output column 8c + AWQ_ORDER[i]."""


class QuantConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How linear weights are stored: the method and, for 4-bit checkpoints, their layout."""

    method: str
    """"fp8", "int8", "gptq" or "awq"."""
    bits: int = 8
    group_size: int = -1
    """Input rows per scale (-1: one group for all rows, a scale per output channel)."""
    desc_act: bool = False
    """GPTQ act-order: rows are assigned to groups by g_idx rather than in order."""
    sym: bool = True
    zero_offset: int = 0
    """Added to the stored zero points: 1 for AutoGPTQ's format ("gptq"), 0 otherwise."""

    @property
    def prequantized(self) -> bool:
        return self.method not in ONLINE


def checkpoint_quant_config(raw: dict[str, Any] | None, where: str) -> QuantConfig | None:
    """The `QuantConfig` of a config.json's `quantization_config` (None when it has none);
    `ConfigError` for what shardlm cannot load."""
    if not raw:
        return None
    method = str(raw.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise ConfigError(
            f"{where} declares quantization_config quant_method={method!r}; shardlm loads pre-quantized "
            "checkpoints in 'gptq' and 'awq' only"
        )
    bits = int(raw.get("bits", raw.get("w_bit", 4)))
    group_size = int(raw.get("group_size", raw.get("q_group_size", 128)))
    if bits != 4:
        raise ConfigError(f"{where}: {method} with bits={bits} is not supported; shardlm loads 4-bit {method} only")
    if group_size != -1 and (group_size < PACK or group_size % PACK):
        raise ConfigError(f"{where}: {method} group_size={group_size} must be -1 or a positive multiple of {PACK}")
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"{where}: AWQ version {version!r} is not supported; shardlm loads the 'gemm' layout")
        if not raw.get("zero_point", True):
            raise ConfigError(f"{where}: AWQ without zero points is not supported")
        return QuantConfig(method="awq", bits=4, group_size=group_size, sym=False)
    checkpoint_format = str(raw.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{where}: GPTQ checkpoint_format {checkpoint_format!r} is not one of 'gptq', 'gptq_v2'")
    return QuantConfig(
        method="gptq",
        bits=4,
        group_size=group_size,
        desc_act=bool(raw.get("desc_act", False)),
        sym=bool(raw.get("sym", True)),
        zero_offset=1 if checkpoint_format == "gptq" else 0,
    )


def resolve_quantization(asked: str | None, found: QuantConfig | None, where: str) -> QuantConfig | None:
    """What the engine loads with, given `quantization=` and the checkpoint's own config."""
    if asked is not None and asked not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization={asked!r} is not supported; choose one of {', '.join(map(repr, QUANTIZATION_METHODS))}")
    if found is not None:
        if asked is not None and asked != found.method:
            raise ConfigError(
                f"quantization={asked!r} disagrees with the checkpoint, whose quantization_config in {where} says "
                f"{found.method!r}; leave quantization unset or pass {found.method!r}"
            )
        return found
    if asked in ("gptq", "awq"):
        raise ConfigError(
            f"quantization={asked!r} needs a {asked.upper()} checkpoint, but {where} has no quantization_config; "
            "for quantizing while loading pass 'fp8' or 'int8'"
        )
    return None if asked is None else QuantConfig(method=asked)


def linear_method(quant: QuantConfig | None) -> LinearMethod:
    if quant is None:
        return Unquantized()
    if quant.method in ONLINE:
        return OnlineQuantized(quant.method)
    return Int4(quant)


def derived(param: nn.Parameter) -> nn.Parameter:
    """A parameter computed while loading, read from no checkpoint tensor."""
    return attach_loader(param, None, {})


class LinearMethod:
    def create_weights(self, layer: ParallelLinear) -> None:
        raise NotImplementedError

    def apply(self, layer: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """X A_r^T (+ bias) for this rank's slice A_r."""
        raise NotImplementedError

    def process_after_loading(self, layer: ParallelLinear) -> None:
        """Turn the loaded checkpoint slices into what `apply` uses."""

    def restore_after_loading(self, layer: ParallelLinear) -> None:
        """Derive what `apply` needs besides the final parameters, once they were read as they are
        (a sharded_state checkpoint)."""


class Unquantized(LinearMethod):
    def create_weights(self, layer: ParallelLinear) -> None:
        def load(param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
            rows = layer.out_shards[shard_id]
            layer.read_weight(source, shard_id, param.data.narrow(0, rows.offset, rows.size), final=True)

        weight = torch.empty(layer.local_out, layer.local_in)
        layer.weight = attach_loader(nn.Parameter(weight, requires_grad=False), load, layer.weight_full_shapes())

    def apply(self, layer: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn_linear.module_linear(layer, x, layer.weight, bias)


class OnlineQuantized(LinearMethod):
    """FP8 e4m3 or int8 weights with a float32 scale per output channel, quantized while loading."""

    DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}

    def __init__(self, method: str) -> None:
        self.method = method

    def create_weights(self, layer: ParallelLinear) -> None:
        compute_dtype = torch.get_default_dtype()

        def load(param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
            rows = layer.out_shards[shard_id]
            full = torch.empty(rows.size, layer.local_in, dtype=compute_dtype, device=param.device)
            layer.read_weight(source, shard_id, full)
            values, scale = self._quantize(full)
            del full
            param.data.narrow(0, rows.offset, rows.size).copy_(values)
            layer.weight_scale.data.narrow(0, rows.offset, rows.size).copy_(scale)

        weight = torch.empty(layer.local_out, layer.local_in, dtype=self.DTYPES[self.method])
        layer.weight = attach_loader(nn.Parameter(weight, requires_grad=False), load, layer.weight_full_shapes())
        layer.weight_scale = derived(nn.Parameter(torch.empty(layer.local_out, dtype=torch.float32), requires_grad=False))

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "fp8":
            from kernels.fp8_linear import quantize_fp8_rows

            return quantize_fp8_rows(w)
        from kernels.int8_linear import quantize_int8_rows

        return quantize_int8_rows(w)

    def apply(self, layer: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.method == "fp8":
            from kernels.fp8_linear import fp8_linear

            return fp8_linear(x, layer.weight, layer.weight_scale, bias)
        from kernels.int8_linear import int8_linear

        return int8_linear(x, layer.weight, layer.weight_scale, bias)


class Int4(LinearMethod):
    """GPTQ or AWQ 4-bit weights: the checkpoint's packed slices, converted after loading."""

    def __init__(self, quant: QuantConfig) -> None:
        self.quant = quant

    def groups(self, in_features: int) -> int:
        size = self.quant.group_size
        return 1 if size == -1 else -(-in_features // size)

    def group_rows(self, in_features: int) -> int:
        return in_features if self.quant.group_size == -1 else self.quant.group_size

    def create_weights(self, layer: ParallelLinear) -> None:
        self._check_split(layer)
        k_full, n_local = layer.in_features, layer.local_out
        g_full, g_local = self.groups(k_full), self._local_groups(layer)
        n_full = {s: (r.full_rows,) for s, r in layer.out_shards.items()}
        awq = self.quant.method == "awq"
        packed_full = {s: (k_full, n // PACK) if awq else (k_full // PACK, n) for s, (n,) in n_full.items()}
        packed_local = (layer.local_in, n_local // PACK) if awq else (layer.local_in // PACK, n_local)
        self._param(layer, "qweight", packed_local, torch.int32, packed_full, self._load_qweight)
        self._param(
            layer,
            "qzeros",
            (g_local, n_local // PACK),
            torch.int32,
            {s: (g_full, n // PACK) for s, (n,) in n_full.items()},
            self._load_groups,
        )
        self._param(
            layer,
            "scales",
            (g_local, n_local),
            torch.get_default_dtype(),
            {s: (g_full, n) for s, (n,) in n_full.items()},
            self._load_groups,
        )
        if not awq:
            self._param(layer, "g_idx", (layer.local_in,), torch.int32, {s: (k_full,) for s in n_full}, self._load_g_idx)

    def _param(self, layer, name: str, shape: tuple, dtype: torch.dtype, full: dict, loader) -> None:
        def load(param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
            loader(layer, name, param, source, shard_id)

        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        setattr(layer, name, attach_loader(param, load, full))

    def _check_split(self, layer: ParallelLinear) -> None:
        method, what = self.quant.method.upper(), type(layer).__name__
        for shard_id, rows in layer.out_shards.items():
            if rows.start % PACK or rows.size % PACK:
                raise ConfigError(
                    f"{method}: this rank's output rows [{rows.start}, {rows.stop}) of {what} shard {shard_id!r} do not "
                    f"fall on multiples of {PACK}, the packing of 4-bit values; choose another tensor_parallel_size"
                )
        if layer.in_start == 0 and layer.in_stop == layer.in_features:
            return
        if layer.in_start % PACK or layer.local_in % PACK:
            raise ConfigError(
                f"{method}: {what}'s input split [{layer.in_start}, {layer.in_stop}) is not a multiple of {PACK} rows"
            )
        if self.splits_groups(layer) and (layer.in_start % self.quant.group_size or layer.local_in % self.quant.group_size):
            raise ConfigError(
                f"{method}: group_size {self.quant.group_size} does not divide this rank's input rows "
                f"[{layer.in_start}, {layer.in_stop}) of {what} at this tensor_parallel_size; a row-parallel split must "
                "fall on group boundaries: choose a tensor_parallel_size that divides the groups"
            )

    def splits_groups(self, layer: ParallelLinear) -> bool:
        """Whether the rank holds only its own input rows' groups: row-parallel, grouped, in order."""
        partial = layer.local_in != layer.in_features
        return partial and self.quant.group_size != -1 and not self.quant.desc_act

    def _local_groups(self, layer: ParallelLinear) -> int:
        if self.splits_groups(layer):
            return layer.local_in // self.quant.group_size
        return self.groups(layer.in_features)

    def _load_qweight(self, layer, name: str, param: nn.Parameter, source: WeightSource, shard_id: ShardId) -> None:
        rows = layer.out_shards[shard_id]
        if self.quant.method == "awq":
            index = (slice(layer.in_start, layer.in_stop), slice(rows.start // PACK, rows.stop // PACK))
            out = param.data.narrow(1, rows.offset // PACK, rows.size // PACK)
        else:
            index = (slice(layer.in_start // PACK, layer.in_stop // PACK), slice(rows.start, rows.stop))
            out = param.data.narrow(1, rows.offset, rows.size)
        source.read(index, out=out)

    def _load_groups(self, layer, name: str, param: nn.Parameter, source: WeightSource, shard_id: ShardId) -> None:
        rows, per = layer.out_shards[shard_id], (PACK if name == "qzeros" else 1)
        g0 = layer.in_start // self.quant.group_size if self.splits_groups(layer) else 0
        index = (slice(g0, g0 + param.shape[0]), slice(rows.start // per, rows.stop // per))
        source.read(index, out=param.data.narrow(1, rows.offset // per, rows.size // per))

    def _load_g_idx(self, layer, name: str, param: nn.Parameter, source: WeightSource, shard_id: ShardId) -> None:
        values = source.read((slice(layer.in_start, layer.in_stop),)).to(torch.int32)
        held = getattr(layer, "_g_idx_from", None)
        if held is not None and not torch.equal(param.data, values.to(param.device)):
            raise WeightLoadError(
                f"{source.name} in {source.file} has a g_idx unlike that of shard {held!r} of the same fused layer; "
                "shardlm fuses these projections and needs them quantized with the same act-order"
            )
        param.data.copy_(values)
        layer._g_idx_from = shard_id

    def sorts_rows(self, layer: ParallelLinear) -> bool:
        """Whether the layer reorders its input rows by group (act-order, all rows held): then its
        groups are contiguous runs, which the 4-bit kernel multiplies fastest."""
        return self.quant.desc_act and layer.local_in == layer.in_features

    def process_after_loading(self, layer: ParallelLinear) -> None:
        if layer.qweight.is_meta:  # the planner: the final layout's shapes, no values
            meta = dict(dtype=torch.int32, device="meta")
            self._replace(
                layer,
                torch.empty(layer.local_in // PACK, layer.local_out, **meta),
                torch.empty(layer.scales.shape, dtype=layer.scales.dtype, device="meta"),
                torch.empty(layer.local_in, **meta),
                torch.empty(layer.local_in, **meta) if self.sorts_rows(layer) else None,
            )
            return
        from kernels.int4_linear import pack_int4_rows, unpack_int4_rows

        zeros = unpack_columns(layer.qzeros.data, self.quant.method == "awq") + self.quant.zero_offset
        if self.quant.method == "awq":
            qweight = pack_int4_rows(unpack_columns(layer.qweight.data, awq=True))
            g_idx = torch.arange(layer.local_in, device=zeros.device, dtype=torch.int32) // self.group_rows(layer.in_features)
        else:
            qweight = layer.qweight.data
            g_idx = layer.g_idx.data
            if self.splits_groups(layer):
                g_idx = g_idx - layer.in_start // self.quant.group_size
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= layer.scales.shape[0]:
            raise WeightLoadError(
                f"{type(layer).__name__}: g_idx refers to groups outside [0, {layer.scales.shape[0]}); "
                "the checkpoint's g_idx and its quantization_config (group_size, desc_act) disagree"
            )
        perm = None
        if self.sorts_rows(layer):  # y = x W^T = x[:, perm] (W[:, perm])^T
            perm = torch.argsort(g_idx, stable=True).to(torch.int32)
            qweight = pack_int4_rows(unpack_int4_rows(qweight)[perm.long()])
            g_idx = g_idx[perm.long()]
        self._replace(layer, qweight.contiguous(), zeros.to(layer.scales.dtype), g_idx.to(torch.int32).contiguous(), perm)

    def _replace(
        self, layer: ParallelLinear, qweight: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, perm: torch.Tensor | None
    ) -> None:
        """Hold the kernel's layout (`kernels.int4_linear`) in place of the checkpoint's, and note
        whether its groups are contiguous runs of one size (`int4_group_size`)."""
        del layer.qzeros
        layer.qweight = derived(nn.Parameter(qweight, requires_grad=False))
        layer.zeros = derived(nn.Parameter(zeros, requires_grad=False))
        layer.g_idx = derived(nn.Parameter(g_idx, requires_grad=False))
        layer.input_perm = None if perm is None else derived(nn.Parameter(perm, requires_grad=False))
        self.restore_after_loading(layer)

    def restore_after_loading(self, layer: ParallelLinear) -> None:
        layer.int4_group_size = None
        g_idx = layer.g_idx.data
        if not g_idx.is_meta:
            size = self.group_rows(layer.in_features)
            contiguous = torch.arange(layer.local_in, device=g_idx.device, dtype=torch.int32) // size
            layer.int4_group_size = size if torch.equal(g_idx, contiguous) else None

    def apply(self, layer: ParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from kernels.int4_linear import int4_linear

        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        return int4_linear(x, layer.qweight, layer.scales, layer.zeros, layer.g_idx, bias, layer.int4_group_size)


def unpack_columns(packed: torch.Tensor, awq: bool) -> torch.Tensor:
    """[R, C] int32 words of eight 4-bit values along the columns -> [R, 8C] int32 values in
    column order (AWQ's interleaved order undone when `awq`)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    values = (packed[:, :, None] >> shifts) & 0xF  # [R, C, 8]: nibble i of each word
    if awq:
        column_of_nibble = torch.tensor(AWQ_ORDER, device=packed.device)
        values = values[:, :, torch.argsort(column_of_nibble)]
    return values.reshape(packed.shape[0], -1)
