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


def pick_architecture(architectures: list[str] | None, where: str) -> str:
    """The first of a config's `architectures` that shardlm runs, or a `ConfigError` listing those it does."""
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return name
    raise ConfigError(
        f"the model's config ({where}) names architectures {architectures or []}, none of which "
        f"shardlm supports; supported: {', '.join(supported_architectures())}"
    )


def model_class(architecture: str) -> type[nn.Module]:
    return MODEL_REGISTRY[pick_architecture([architecture], "ModelArch")]
