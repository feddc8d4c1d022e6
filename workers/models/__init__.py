"""The model registry: a config's `architectures` entry -> the class that runs it."""

from __future__ import annotations

from torch import nn

from parallel.errors import ConfigError
from workers.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""A config's `model_type` -> the architecture it implies, for configs that name none."""


def pick_architecture(architectures: list[str] | None, where: str, model_type: str | None = None) -> str:
    """The first of a config's `architectures` that shardlm runs (or, when it names none, the one its
    `model_type` implies); else a `ConfigError` listing those shardlm supports."""
    if not architectures and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return name
    raise ConfigError(
        f"the model's config ({where}) names architectures {architectures or []} (model_type "
        f"{model_type!r}), none of which "
        f"shardlm supports; supported: {', '.join(supported_architectures())}"
    )


def model_class(architecture: str) -> type[nn.Module]:
    return MODEL_REGISTRY[pick_architecture([architecture], "ModelArch")]
