"""Reading a model's config (config.json, or a GGUF file's metadata) into shardlm's `ModelArch`,
and resolving what depends on it: the dtype and the longest sequence.

config.json is read as JSON, with transformers' defaults for the fields a Llama-family config may
omit, rather than through `AutoConfig`, whose import alone costs seconds at every engine start;
tests check that both readings agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from driver.config.max_len import derived_max_len, position_limit, sliding_window, too_long
from parallel.errors import ConfigError
from workers.config import ModelArch, RopeScaling
from workers.gguf_file import gguf_model_config, read_gguf_index
from workers.model_files import ModelFiles
from workers.models import pick_architecture
from workers.models.layers import SUPPORTED_ROPE_TYPES

REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(max_position_embeddings=2048, rms_norm_eps=1e-6),
    "MistralForCausalLM": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, sliding_window=4096, num_key_value_heads=8),
    "Qwen2ForCausalLM": dict(
        max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=4096, use_sliding_window=False, num_key_value_heads=32
    ),
}
"""transformers' defaults for fields a config.json may leave out, per architecture."""


def load_hf_config(files: ModelFiles) -> SimpleNamespace:
    """The model's config, transformers' field names as attributes: config.json with the defaults
    of its architecture filled in, or a GGUF file's metadata. Unsupported architectures are a
    `ConfigError` that lists the supported ones."""
    if files.gguf_file is not None:
        return SimpleNamespace(**gguf_model_config(read_gguf_index(str(Path(files.folder) / files.gguf_file))))
    path = Path(files.folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    architecture = pick_architecture(raw.get("architectures"), str(path), raw.get("model_type"))
    return SimpleNamespace(**{**DEFAULTS[architecture], **raw})


def model_arch(cfg: Any, files: ModelFiles) -> ModelArch:
    """The decoder's shape from a transformers config (v4 and v5 spellings both)."""
    where = str(Path(files.folder) / (files.gguf_file or "config.json"))
    architecture = pick_architecture(getattr(cfg, "architectures", None), where, getattr(cfg, "model_type", None))
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={cfg.hidden_act!r}; shardlm's Llama-family models use 'silu'")
    missing = [k for k in REQUIRED if getattr(cfg, k, None) is None]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}, which a {architecture} config must give")
    heads = cfg.num_attention_heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    theta, scaling = rope_settings(cfg, where)
    return ModelArch(
        architecture=architecture,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=getattr(cfg, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
        o_bias=architecture == "LlamaForCausalLM" and attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )


def rope_settings(cfg: Any, where: str) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    params.update(getattr(cfg, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    known = {
        f: params[f] for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if f in params
    }
    return theta, RopeScaling(rope_type=rope_type, **known)


def checkpoint_dtype(cfg: Any) -> str | None:
    """The checkpoint's dtype: `dtype` in transformers 5, `torch_dtype` before."""
    attrs = vars(cfg)
    value = attrs.get("dtype") or attrs.get("torch_dtype")
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value if isinstance(value, str) else None


def resolve_dtype(requested: str, checkpoint: str | None, device: str, capability: tuple[int, int] | None = None) -> str:
    """The compute dtype: see `EngineArgs.dtype`. `capability`: the GPUs' compute capability (CUDA)."""
    capability = tuple(capability) if capability is not None else None
    if requested != "auto":
        if requested == "bfloat16" and capability is not None and capability < (8, 0):
            raise ConfigError(
                f"dtype='bfloat16' needs compute capability 8.0 or newer; this GPU has "
                f"{capability[0]}.{capability[1]}: use dtype='float16'"
            )
        return requested
    if device == "cpu":
        return "float32"
    if checkpoint in ("bfloat16", "float16"):
        return "float16" if checkpoint == "bfloat16" and capability < (8, 0) else checkpoint
    return "bfloat16" if capability >= (8, 0) else "float16"


def derived_max_model_len(cfg: Any, arch: ModelArch) -> int:
    """The longest sequence the config allows (`driver.config.max_len`)."""
    fields = vars(cfg)
    scaling = arch.rope_scaling
    return derived_max_len(
        position_limit(fields) or 2048, scaling.rope_type, scaling.factor, sliding_window(fields, arch.architecture)
    )


def resolve_max_model_len(cfg: Any, arch: ModelArch, requested: int | None) -> int:
    derived = derived_max_model_len(cfg, arch)
    if requested is None:
        return derived
    if requested > derived:
        raise too_long(requested, derived)
    return requested
