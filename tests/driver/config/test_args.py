"""EngineArgs: vLLM's names, clear errors, and resolution into frozen configs that travel whole."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import msgspec
import pytest
import torch

from driver import EngineArgs
from driver.config.model_config import derived_max_model_len, load_hf_config, model_arch, resolve_dtype, rope_settings
from driver.entrypoints.cli import field_docs
from parallel.errors import ConfigError
from workers.config import EngineConfig
from workers.gguf_file import gguf_model_config, read_gguf_index
from workers.model_files import find_model


def test_unknown_keyword_names_the_nearest_valid_one() -> None:
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument 'tensor_paralel_size'; did you mean 'tensor_parallel_size'\?"
    ):
        EngineArgs(tensor_paralel_size=2)
    with pytest.raises(TypeError, match="'modle'.*did you mean 'model'"):
        EngineArgs.from_kwargs(modle="x")
    with pytest.raises(TypeError, match="valid ones: model, tokenizer"):
        EngineArgs(zzzzzz=1)


def test_every_field_is_documented() -> None:
    docs = field_docs(EngineArgs)
    missing = [f for f in EngineArgs.__dataclass_fields__ if not docs.get(f)]
    assert not missing


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dtype="fp32"), "dtype='fp32' is not one of"),
        (dict(load_format="npz"), "load_format='npz' is not one of"),
        (dict(block_size=24), "block_size=24 is not one of"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size=0 must be a positive integer"),
        (dict(max_model_len=-5), "max_model_len=-5 must be a positive integer"),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization=1.5 must be in \(0, 1\]"),
        (dict(quantization="bitsandbytes"), "quantization='bitsandbytes' is not one of 'fp8', 'int8', 'gptq', 'awq'"),
        (dict(kv_cache_dtype="int4"), "kv_cache_dtype='int4' is not one of 'auto', 'fp8', 'fp8_e4m3'"),
        (dict(tokenizer_mode="fast"), "tokenizer_mode='fast' is not one of"),
        (dict(max_num_seqs=64, max_num_batched_tokens=32), r"max_num_batched_tokens \(32\) must be at least max_num_seqs \(64\)"),
    ],
)
def test_invalid_values_are_config_errors(tiny_checkpoint, kwargs, message) -> None:
    """The message names the keyword as Python writes it; `field` names it for a front end
    (the command line says --max-model-len)."""
    with pytest.raises(ConfigError, match=message) as refused:
        EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cpu", **kwargs).create_engine_config()
    assert refused.value.field == ("max_num_batched_tokens" if "max_num_batched_tokens" in kwargs else next(iter(kwargs)))


def test_cuda_asked_without_cuda(tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' was asked for, but torch sees no CUDA device"):
        EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cuda").create_engine_config()


def test_config_is_frozen_and_round_trips_through_msgspec(tiny_checkpoint) -> None:
    config = EngineArgs(model=str(tiny_checkpoint("qwen2")[0]), device="cpu", max_model_len=128).create_engine_config()
    with pytest.raises(AttributeError):
        config.model.max_model_len = 7
    wire = msgspec.msgpack.encode(config)
    assert msgspec.msgpack.decode(wire, type=EngineConfig) == config
    assert config.model.arch.qkv_bias and not config.model.arch.o_bias
    assert config.scheduler.max_model_len == config.model.max_model_len == 128
    assert config.scheduler.max_num_batched_tokens == 2048  # the CPU default


@pytest.mark.parametrize(
    "requested,checkpoint,device,capability,expected",
    [
        ("auto", "float32", "cpu", None, "float32"),
        ("auto", "bfloat16", "cpu", None, "float32"),
        ("auto", "float32", "cuda", (9, 0), "bfloat16"),
        ("auto", "float32", "cuda", (7, 5), "float16"),
        ("auto", None, "cuda", (8, 0), "bfloat16"),
        ("auto", "float16", "cuda", (9, 0), "float16"),
        ("auto", "bfloat16", "cuda", (9, 0), "bfloat16"),
        ("auto", "bfloat16", "cuda", (7, 0), "float16"),
        ("float16", "bfloat16", "cpu", None, "float16"),
    ],
)
def test_dtype_resolution(requested, checkpoint, device, capability, expected) -> None:
    assert resolve_dtype(requested, checkpoint, device, capability) == expected


def test_bfloat16_on_old_gpus_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs compute capability 8.0"):
        resolve_dtype("bfloat16", "float32", "cuda", (7, 0))


def test_max_model_len_from_config_and_user(tiny_checkpoint) -> None:
    llama = str(tiny_checkpoint("llama")[0])
    assert EngineArgs(model=llama, device="cpu").create_engine_config().model.max_model_len == 256
    assert (
        EngineArgs(model=str(tiny_checkpoint("llama_linear_rope")[0]), device="cpu").create_engine_config().model.max_model_len
        == 512
    )
    with pytest.raises(ConfigError, match=r"max_model_len=300 is larger than the model allows \(256") as refused:
        EngineArgs(model=llama, max_model_len=300, device="cpu").create_engine_config()
    assert refused.value.field == "max_model_len"


def test_sliding_window_caps_the_length() -> None:
    arch = SimpleNamespace(rope_scaling=rope_settings(SimpleNamespace(), "x")[1], architecture="MistralForCausalLM")
    assert derived_max_model_len(SimpleNamespace(max_position_embeddings=32768, sliding_window=4096), arch) == 4096
    qwen = SimpleNamespace(rope_scaling=arch.rope_scaling, architecture="Qwen2ForCausalLM")
    assert derived_max_model_len(SimpleNamespace(max_position_embeddings=32768, sliding_window=4096), qwen) == 32768


def test_unsupported_architecture_lists_the_supported(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama")[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match=r"\['GPT2LMHeadModel'\].*supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    ):
        EngineArgs(model=str(folder)).create_engine_config()


def test_unsupported_rope_scaling(tiny_checkpoint) -> None:
    cfg = SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported"):
        rope_settings(cfg, "config.json")


def test_heads_not_divisible_by_tp_are_refused(tiny_checkpoint) -> None:
    from parallel.state import TensorParallelGroup
    from workers.loader import build_model

    config = EngineArgs(model=str(tiny_checkpoint("llama")[0]), device="cpu").create_engine_config()
    with pytest.raises(
        ConfigError, match=r"Total number of attention heads \(4\) must be divisible by tensor parallel size \(3\)\."
    ):
        build_model(config, TensorParallelGroup(rank=0, size=3), torch.device("cpu"))


@pytest.mark.parametrize("family", ["llama", "llama_tied", "llama_bias", "llama3_rope", "llama_linear_rope", "mistral", "qwen2"])
def test_config_json_reading_matches_transformers(tiny_checkpoint, family) -> None:
    """Reading config.json as JSON gives the same architecture and length as transformers' AutoConfig."""
    from transformers import AutoConfig

    folder = tiny_checkpoint(family)[0]
    files = find_model(str(folder))
    ours, theirs = load_hf_config(files), AutoConfig.from_pretrained(folder)
    assert model_arch(ours, files) == model_arch(theirs, files)
    arch = model_arch(ours, files)
    assert derived_max_model_len(ours, arch) == derived_max_model_len(theirs, arch)


def test_omitted_fields_take_transformers_defaults(tmp_path) -> None:
    from transformers import AutoConfig

    for architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        sparse = {
            "architectures": [architecture],
            "model_type": architecture[:-11].lower(),
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 300,
        }
        (tmp_path / "config.json").write_text(json.dumps(sparse))
        files = SimpleNamespace(folder=str(tmp_path), gguf_file=None)
        ours, theirs = load_hf_config(files), AutoConfig.from_pretrained(tmp_path)
        arch = model_arch(ours, files)
        assert arch == model_arch(theirs, files), architecture
        assert derived_max_model_len(ours, arch) == derived_max_model_len(theirs, arch), architecture


def test_config_missing_a_required_field(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="lacks intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"):
        EngineArgs(model=str(tmp_path)).create_engine_config()


def test_gguf_config_matches_transformers(smollm2_gguf) -> None:
    """The architecture read from GGUF metadata equals transformers' own GGUF config reading."""
    from transformers import AutoConfig

    files = find_model(str(smollm2_gguf))
    ours = model_arch(SimpleNamespace(**gguf_model_config(read_gguf_index(str(smollm2_gguf)))), files)
    theirs = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    theirs.architectures = ["LlamaForCausalLM"]
    assert ours == model_arch(theirs, files)
    assert (ours.num_heads, ours.num_kv_heads, ours.num_layers, ours.tie_word_embeddings) == (9, 3, 30, True)


def test_a_config_error_keeps_its_field_across_processes() -> None:
    """Ray pickles a worker's error to the driver; the field the command line speaks of survives."""
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("max_model_len=9 is too long", field="max_model_len")))
    assert (str(error), error.field) == ("max_model_len=9 is too long", "max_model_len")
    assert ConfigError("no field").field is None
