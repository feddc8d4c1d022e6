"""shardlm's public API.

Each name is imported when first asked for (`from driver import LLM` imports the LLM's module
alone), so that `import driver` costs nothing: an engine start imports torch and the engine
beside Ray's start rather than before it (`driver.entrypoints.llm`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from driver.config.args import EngineArgs
    from driver.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from driver.engine.report import LoadReport
    from driver.engine.tokenizer import IncrementalDetokenizer, load_tokenizer
    from driver.entrypoints.llm import LLM
    from parallel.errors import (
        ClusterError,
        ConfigError,
        EngineDeadError,
        InsufficientMemory,
        ModelNotFound,
        ShardLMError,
        WeightLoadError,
    )
    from workers.sampling_params import SamplingParams

_EXPORTS = {
    "EngineArgs": "driver.config.args",
    "LLM": "driver.entrypoints.llm",
    "CompletionOutput": "driver.engine.outputs",
    "Logprob": "driver.engine.outputs",
    "RequestMetrics": "driver.engine.outputs",
    "RequestOutput": "driver.engine.outputs",
    "LoadReport": "driver.engine.report",
    "IncrementalDetokenizer": "driver.engine.tokenizer",
    "load_tokenizer": "driver.engine.tokenizer",
    "ClusterError": "parallel.errors",
    "ConfigError": "parallel.errors",
    "EngineDeadError": "parallel.errors",
    "InsufficientMemory": "parallel.errors",
    "ModelNotFound": "parallel.errors",
    "ShardLMError": "parallel.errors",
    "WeightLoadError": "parallel.errors",
    "SamplingParams": "workers.sampling_params",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'driver' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # asked for once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
