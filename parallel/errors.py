"""shardlm's exceptions.

They live in the lowest layer that raises them (weight loaders raise `WeightLoadError`) and are
re-exported by `workers` and `driver`. Every message names the input, what was expected and what
to do about it.
"""

from __future__ import annotations


class ShardLMError(Exception):
    """Base class of every error shardlm raises on purpose."""


class ConfigError(ShardLMError, ValueError):
    """An engine argument, or the model's config, cannot be used as given."""


class ModelNotFound(ShardLMError, FileNotFoundError):
    """The model (a folder, a repo id, a GGUF file or the embedded default) cannot be found."""


class WeightLoadError(ShardLMError):
    """A checkpoint's tensors do not match the model that the config describes."""


class InsufficientMemory(ShardLMError, MemoryError):
    """The device has no room for what was asked (weights, activations or the KV cache)."""


class EngineDeadError(ShardLMError, RuntimeError):
    """A worker died; the engine cannot go on and every request in flight gets this error."""


class ClusterError(ShardLMError, RuntimeError):
    """The Ray cluster cannot give the engine what it needs (resources, a reachable node)."""


class EngineAsleepError(ShardLMError, RuntimeError):
    """A request reached an engine put to sleep (`llm.sleep()`): wake it up first."""
