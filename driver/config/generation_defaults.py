"""Sampling defaults from the model's generation_config.json, as vLLM's generation_config="auto".

A request's own values come first, then the model's defaults, then SamplingParams' own. The file
is read as JSON (no transformers import): the fields below, where the file sets them to something
other than transformers' `GenerationConfig` defaults (vLLM reads the file's difference from them).
A GGUF file carries no generation config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from parallel.errors import ConfigError
from workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from workers.config import ModelConfig

logger = logging.getLogger(f"shardlm.{__name__}")

GENERATION_CONFIG_FILE = "generation_config.json"
FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
"""generation_config.json's names -> SamplingParams' names."""
TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
"""A value equal to transformers' default is not the model's choice, and is left to shardlm's."""
INTEGER_FIELDS = ("top_k", "max_tokens")


class GenerationDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """The sampling defaults in force for one engine."""

    values: dict[str, float | int] = {}
    """SamplingParams fields and the model's values for them; empty: shardlm's own defaults."""
    source: str = "no model"
    """Where `values` come from (generation_config.json), or why there are none."""

    def describe(self) -> str:
        """One line for the load report."""
        if not self.values:
            return f"sampling defaults: shardlm's ({self.source})"
        shown = " ".join(f"{name}={value}" for name, value in self.values.items())
        return f"sampling defaults: {shown} from {self.source}"


def load_generation_defaults(mode: str, model: ModelConfig) -> GenerationDefaults:
    """The defaults `mode` ("auto" or "vllm", `EngineArgs.generation_config`) puts in force for
    `model`. A file whose values SamplingParams refuses is a `ConfigError`, at the engine's start."""
    if mode == "vllm":
        return GenerationDefaults(source="generation_config='vllm'")
    if model.gguf_file is not None:
        return GenerationDefaults(source="a GGUF file carries no generation_config.json")
    path = Path(model.path) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationDefaults(source=f"the model has no {GENERATION_CONFIG_FILE}")
    values = _read_values(path)
    if not values:
        return GenerationDefaults(source=f"{GENERATION_CONFIG_FILE} sets none of {', '.join(FIELDS)}")
    try:
        SamplingParams(**values)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}; fix the file, or pass generation_config='vllm' to ignore it") from None
    return GenerationDefaults(values=values, source=GENERATION_CONFIG_FILE)


def _read_values(path: Path) -> dict[str, float | int]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix it, or pass generation_config='vllm' to ignore it") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object; pass generation_config='vllm' to ignore it")
    values: dict[str, float | int] = {}
    for key, name in FIELDS.items():
        value = raw.get(key)
        if value is None or value == TRANSFORMERS_DEFAULTS.get(key):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{path}: {key}={value!r} is not a number; fix the file, or pass generation_config='vllm' to ignore it"
            )
        values[name] = int(value) if name in INTEGER_FIELDS else float(value)
    return values


def sampling_params_with_defaults(
    given: dict[str, Any], defaults: GenerationDefaults, fallback: dict[str, Any] | None = None
) -> SamplingParams:
    """SamplingParams from the fields a request set (`given`; None: not set), else the model's
    defaults, else `fallback` (a caller's own defaults, e.g. a longer max_tokens for chat), else
    SamplingParams' own. SamplingParams' checks raise ValueError."""
    typed = {name: value for name, value in given.items() if value is not None}
    return SamplingParams(**{**(fallback or {}), **defaults.values, **typed})
