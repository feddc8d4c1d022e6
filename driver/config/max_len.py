"""The longest sequence a model's config allows, one rule for the engine's configuration
(`driver.config.model_config`) and the checks made before Ray starts (`driver.entrypoints.preflight`).
No torch: the checks before Ray starts read config.json as plain JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parallel.errors import ConfigError

MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
"""Config fields that bound the positions, in any of the names models give them."""
DEFAULT_WINDOW = 4096
"""transformers' sliding_window for Mistral and Qwen2 configs that leave it out."""


def position_limit(cfg: Mapping[str, Any]) -> int | None:
    """The smallest position bound the config states (None: it states none)."""
    limits = [cfg[key] for key in MAX_LEN_KEYS if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool)]
    return min(limits) if limits else None


def sliding_window(cfg: Mapping[str, Any], architecture: str) -> int | None:
    """The attention window that applies to every layer, if any (Mistral; Qwen2 with use_sliding_window)."""
    if architecture == "MistralForCausalLM" or (architecture == "Qwen2ForCausalLM" and cfg.get("use_sliding_window")):
        return cfg.get("sliding_window", DEFAULT_WINDOW)
    return None


def derived_max_len(limit: int, rope_type: str, factor: float, window: int | None) -> int:
    """The position bound, stretched by linear rope scaling and capped by a sliding window
    (attention is computed over the whole sequence, so a longer one would not match the model)."""
    derived = int(limit * factor) if rope_type == "linear" else limit
    return min(derived, window) if window else derived


def too_long(requested: int, derived: int) -> ConfigError:
    return ConfigError(
        f"max_model_len={requested} is larger than the model allows ({derived}, from its config's "
        f"max_position_embeddings, rope scaling and sliding window); use max_model_len <= {derived}",
        field="max_model_len",
    )
