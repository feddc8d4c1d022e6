"""Checks that need neither torch nor a cluster, made before Ray starts (its start then overlaps
the imports of torch and the engine, `driver.entrypoints.llm`): sizes that are not positive
integers, device="cuda" on a machine without a GPU, a local model that is missing, and a
max_model_len longer than the model's config allows."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driver.config.max_len import derived_max_len, position_limit, sliding_window, too_long
from parallel.errors import ConfigError, WeightLoadError

if TYPE_CHECKING:
    from workers.model_files import ModelFiles


def check_local_model(model: str | None, engine_args: dict[str, Any]) -> None:
    """Refuse a missing local model (or a missing default) at once, and a max_model_len longer
    than its config allows; a Hub id is found later."""
    from workers.model_files import find_model

    if model is not None and not isinstance(model, str):
        return  # EngineArgs says what it takes
    looks_local = (
        not model
        or Path(model).expanduser().exists()
        or model.endswith(".gguf")
        or model.startswith(("/", ".", "~"))
        or model.count("/") > 1
    )
    if looks_local:
        files = find_model(model, load_format=engine_args.get("load_format", "auto"))
        check_max_model_len(files, engine_args.get("max_model_len"))


def check_sizes(engine_args: dict[str, Any]) -> None:
    """tensor_parallel_size and max_num_seqs that are not positive integers: refused at once, as
    `EngineArgs.validate` would after Ray's start (its module imports torch)."""
    for name in ("tensor_parallel_size", "max_num_seqs"):
        value = engine_args.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer", field=name)


def check_device(device: Any, ray_address: str | None) -> None:
    """device="cuda" on a machine with no GPU, where a local cluster would start: refused at once."""
    if device != "cuda" or ray_address or os.environ.get("RAY_ADDRESS") or machine_may_have_gpu():
        return
    raise ConfigError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'", field="device")


def machine_may_have_gpu() -> bool:
    """torch's answer where it is imported already; else False only where this machine shows no
    NVIDIA device (nor WSL's GPU device) or CUDA_VISIBLE_DEVICES hides them all."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def check_max_model_len(files: ModelFiles, requested: Any) -> None:
    """`driver.config.model_config.resolve_max_model_len`'s refusal, with its message, read without torch."""
    if not isinstance(requested, int) or isinstance(requested, bool):
        return
    derived = config_max_len(files)
    if derived is not None and requested > derived:
        raise too_long(requested, derived)


def config_max_len(files: ModelFiles) -> int | None:
    """The longest sequence the model's config allows, reckoned as
    `driver.config.model_config.derived_max_model_len` does; None where this plain reading is not sure
    (the engine's own check decides then)."""
    try:
        cfg = gguf_config(files) if files.gguf_file else json.loads((Path(files.folder) / "config.json").read_text())
    except (OSError, ValueError, struct.error, WeightLoadError):  # the engine's index says what is wrong
        return None
    if not isinstance(cfg, dict):
        return None
    names = cfg.get("architectures") or []
    architecture = next(
        (n for n in names if n in MODEL_TYPES.values()), None if names else MODEL_TYPES.get(cfg.get("model_type"))
    )
    limit = position_limit(cfg)
    if architecture is None or limit is None:
        return None
    try:
        rope = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
        rope_type = rope.get("rope_type", rope.get("type"))
        factor = float(rope["factor"]) if rope_type == "linear" else 1.0
    except (KeyError, TypeError, ValueError):
        return None
    return derived_max_len(limit, rope_type or "default", factor, sliding_window(cfg, architecture))


def gguf_config(files: ModelFiles) -> dict[str, Any]:
    """What `workers.gguf_file.gguf_model_config` takes from a GGUF file for the sequence length."""
    from workers.gguf_metadata import read_gguf_scalars

    metadata = read_gguf_scalars(str(Path(files.folder) / files.gguf_file))
    arch = metadata.get("general.architecture")
    config: dict[str, Any] = {"model_type": arch, "sliding_window": metadata.get(f"{arch}.attention.sliding_window")}
    if f"{arch}.context_length" in metadata:
        config["max_position_embeddings"] = metadata[f"{arch}.context_length"]
    config["use_sliding_window"] = config["sliding_window"] is not None
    if metadata.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": metadata[f"{arch}.rope.scaling.factor"]}
    return config


def requested_ranks(engine_args: dict[str, Any]) -> int:
    """tensor_parallel_size as given (EngineArgs refuses a bad one later), for a local cluster's CPUs."""
    size = engine_args.get("tensor_parallel_size", 1)
    return size if isinstance(size, int) and size > 0 else 1
