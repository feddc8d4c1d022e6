"""shardlm's exceptions.

They live in the lowest layer that raises them (weight loaders raise `WeightLoadError`) and are
re-exported by `workers` and `driver`. Every message names the input, what was expected and what
to do about it.
"""

from __future__ import annotations


class ShardLMError(Exception):
    """Base class of every error shardlm raises on purpose."""


class ConfigError(ShardLMError, ValueError):
    """An engine argument, or the model's config, cannot be used as given.

    `field` names the argument at fault (`"max_model_len"`) where there is one, so that a front
    end can speak of it in its own spelling: the message says `max_model_len=999999`, as Python
    is written; the command line says `--max-model-len 999999`.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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


class SchedulingStalled(ShardLMError, RuntimeError):
    """Requests are unfinished, and none of them can be scheduled: the message says what blocks
    them. The engine waits rather than spin; an abort (or, when serving, a new request) moves it."""
