"""Quantized linear layers: each rank's slice of a GPTQ / AWQ checkpoint (written by the tests' own
packer) or of a float checkpoint quantized while loading, combined over the ranks as the
collectives would, against the dequantized weights.

Tolerances: 4-bit layers multiply exactly the dequantized values (float16 scales widened to
float32), so they agree with F.linear on the dequantized weights to float32 rounding (1e-4 on
outputs of size ~10). Online int8 / fp8 is checked exactly against its own dequantized weight and
loosely against the float weight: a per-channel scale bounds each weight's error by scale / 2
(int8) or by 2^-4 relative (e4m3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from parallel.errors import ConfigError
from parallel.layers import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from parallel.quantization import QuantConfig, checkpoint_quant_config, resolve_quantization
from parallel.state import TensorParallelGroup
from tests.quant_packer import Scheme, act_order_generator, pack, quantize
from workers.read_stats import ReadStats
from workers.safetensors_file import iter_safetensors

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTER = 256, 32, 8, 2, 512
SHAPES = {  # checkpoint tensor -> [out, in]
    "q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "gate_proj": (INTER, HIDDEN),
    "up_proj": (INTER, HIDDEN),
    "down_proj": (HIDDEN, INTER),
}
SCHEMES = {
    "gptq-g32-sym": Scheme("gptq", 32, sym=True),
    "gptq-g64-asym-act-order": Scheme("gptq", 64, sym=False, desc_act=True),
    "gptq-g128-asym": Scheme("gptq", 128, sym=False),
    "gptq-per-channel": Scheme("gptq", -1, sym=True),
    "awq-g128": Scheme("awq", 128),
    "awq-g64": Scheme("awq", 64),
}


def quant_config(scheme: Scheme) -> QuantConfig:
    found = checkpoint_quant_config(scheme.quantization_config(), "config.json")
    assert found is not None and found.method == scheme.method
    return found


@pytest.fixture(scope="module")
def float_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: torch.randn(shape) * 0.05 for name, shape in SHAPES.items()}


@pytest.fixture(scope="module", params=list(SCHEMES), ids=list(SCHEMES))
def packed(request, float_weights, tmp_path_factory) -> tuple[Scheme, dict, dict[str, torch.Tensor]]:
    """(scheme, the checkpoint's sources by name, each layer's dequantized weight)."""
    scheme = SCHEMES[request.param]
    tensors, dequantized = {}, {}
    for name, w in float_weights.items():
        quantized = quantize(w, scheme, act_order_generator(name))
        dequantized[name] = quantized["dequantized"]
        tensors.update({f"{name}.{k}": v for k, v in pack(quantized, scheme).items()})
    path = tmp_path_factory.mktemp("quant") / "model.safetensors"
    save_file(tensors, str(path))
    return scheme, {s.name: s for s in iter_safetensors(str(path), ReadStats())}, dequantized


def load(layer, sources: dict, names: dict) -> None:
    """Feed each parameter of `layer` from `names` (shard id -> checkpoint module), then finish loading."""
    for param_name, param in list(layer.named_parameters()):
        for shard_id in param.full_shapes:
            source = sources[f"{names[shard_id]}.{param_name}"]
            assert tuple(source.shape) == tuple(param.full_shapes[shard_id])
            param.weight_loader(param, source, shard_id)
    layer.process_weights_after_loading()


def ranks(size: int) -> list[TensorParallelGroup]:
    return [TensorParallelGroup(rank=r, size=size) for r in range(size)]


@pytest.mark.parametrize("tp", [1, 2])
def test_column_parallel_slices_make_the_dequantized_product(packed, tp) -> None:
    scheme, sources, deq = packed
    quant, x = quant_config(scheme), torch.randn(5, HIDDEN)
    outputs = []
    for group in ranks(tp):
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, group, quant)
        load(qkv, sources, {"q": "q_proj", "k": "k_proj", "v": "v_proj"})
        gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], False, group, quant)
        load(gate_up, sources, {0: "gate_proj", 1: "up_proj"})
        outputs.append((qkv.split(qkv(x)), gate_up(x).chunk(2, dim=-1)))
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        whole = torch.cat([out[0][i] for out in outputs], dim=-1)
        torch.testing.assert_close(whole, F.linear(x, deq[name]), atol=1e-4, rtol=1e-4)
    for i, name in enumerate(("gate_proj", "up_proj")):
        whole = torch.cat([out[1][i] for out in outputs], dim=-1)
        torch.testing.assert_close(whole, F.linear(x, deq[name]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_row_parallel_partial_sums_make_the_dequantized_product(packed, tp) -> None:
    scheme, sources, deq = packed
    quant = quant_config(scheme)
    for name, features in (("o_proj", HEADS * HEAD_DIM), ("down_proj", INTER)):
        x, total = torch.randn(3, features), 0
        for group in ranks(tp):
            layer = RowParallelLinear(features, HIDDEN, False, group, quant)
            load(layer, sources, {None: name})
            total = total + layer.method.apply(layer, x[:, layer.in_start : layer.in_stop], None)
        torch.testing.assert_close(total, F.linear(x, deq[name]), atol=1e-4, rtol=1e-4)


def test_4bit_layers_hold_about_a_quarter_of_bfloat16(packed) -> None:
    scheme, sources, _ = packed
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = RowParallelLinear(INTER, HIDDEN, False, TensorParallelGroup.single(), quant_config(scheme))
        load(layer, sources, {None: "down_proj"})
    finally:
        torch.set_default_dtype(previous)
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    # half a byte per weight, plus a scale and a zero (2 bytes each) per group and output: 0.27 at
    # group size 128, 0.32 at 32 (the int32 g_idx adds 4 bytes per input row)
    assert 0.25 <= held / (INTER * HIDDEN * 2) <= 0.33


def test_a_row_split_off_group_boundaries_is_refused() -> None:
    quant = quant_config(Scheme("gptq", 128))
    with pytest.raises(ConfigError, match=r"group_size 128 does not divide this rank's input rows \[96, 192\)"):
        RowParallelLinear(192, 64, False, TensorParallelGroup(rank=1, size=2), quant)
    act_order = quant_config(Scheme("gptq", 128, desc_act=True))  # every rank keeps all groups: any split
    RowParallelLinear(192, 64, False, TensorParallelGroup(rank=1, size=2), act_order)
    with pytest.raises(ConfigError, match="multiples of 8"):
        ColumnParallelLinear(64, 36, False, TensorParallelGroup(rank=1, size=3), quant)


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("tp", [1, 2])
def test_online_quantization_per_output_channel(float_weights, tmp_path: Path, method, tp) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in float_weights.items()}, str(path))
    sources = {s.name.removesuffix(".weight"): s for s in iter_safetensors(str(path), ReadStats())}
    quant, x = QuantConfig(method=method), torch.randn(4, INTER)
    gate_up_out, down_sum = [], 0
    for group in ranks(tp):
        gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], False, group, quant)
        down = RowParallelLinear(INTER, HIDDEN, False, group, quant)
        for layer, names in ((gate_up, {0: "gate_proj", 1: "up_proj"}), (down, {None: "down_proj"})):
            for shard_id, name in names.items():
                layer.weight.weight_loader(layer.weight, sources[name], shard_id)
        assert gate_up.weight.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[method]
        dequantized = gate_up.weight.float() * gate_up.weight_scale[:, None]
        torch.testing.assert_close(gate_up(x[:, :HIDDEN]), F.linear(x[:, :HIDDEN], dequantized), atol=1e-4, rtol=1e-4)
        gate_up_out.append(gate_up(x[:, :HIDDEN]).chunk(2, dim=-1))
        down_sum = down_sum + down.method.apply(down, x[:, down.in_start : down.in_stop], None)
    w, xh = float_weights, x[:, :HIDDEN]
    check_rounding_bound(torch.cat([o[0] for o in gate_up_out], -1), xh, w["gate_proj"], method)
    check_rounding_bound(torch.cat([o[1] for o in gate_up_out], -1), xh, w["up_proj"], method)
    check_rounding_bound(down_sum, x, w["down_proj"], method)


def check_rounding_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, method: str) -> None:
    """|y - x W^T| <= |x| |E|^T, with |E| the largest rounding error of each weight: half a step
    (amax / 254) for int8, 2^-4 relative for e4m3 (plus 2^-10 x scale for subnormals)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    error = amax / 254 if method == "int8" else w.abs() * 2**-4 + amax / 448 * 2**-10
    bound = F.linear(x.abs(), error.expand_as(w))
    assert ((y - F.linear(x, w)).abs() <= bound + 1e-5).all()


def test_quantization_settings_are_checked_against_the_checkpoint() -> None:
    gptq = checkpoint_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "m/config.json")
    assert gptq is not None and gptq.zero_offset == 1
    with pytest.raises(ConfigError, match=r"quantization='awq' disagrees with the checkpoint.*says 'gptq'"):
        resolve_quantization("awq", gptq, "m/config.json")
    with pytest.raises(ConfigError, match="quantization='fp8' disagrees"):
        resolve_quantization("fp8", gptq, "m/config.json")
    with pytest.raises(ConfigError, match="needs a GPTQ checkpoint, but m/config.json has no quantization_config"):
        resolve_quantization("gptq", None, "m/config.json")
    with pytest.raises(ConfigError, match="bits=8 is not supported"):
        checkpoint_quant_config({"quant_method": "gptq", "bits": 8}, "m/config.json")
    with pytest.raises(ConfigError, match="quant_method='bitsandbytes'.*'gptq' and 'awq' only"):
        checkpoint_quant_config({"quant_method": "bitsandbytes"}, "m/config.json")
    assert resolve_quantization(None, gptq, "m/config.json") is gptq
    assert resolve_quantization("int8", None, "m/config.json") == QuantConfig(method="int8")
