"""shardlm's public API."""

from driver.args import EngineArgs
from driver.report import LoadReport
from driver.tokenizer import IncrementalDetokenizer, load_tokenizer
from parallel.errors import (
    ConfigError,
    EngineDeadError,
    InsufficientMemory,
    ModelNotFound,
    ShardLMError,
    WeightLoadError,
)

__all__ = [
    "ConfigError",
    "EngineArgs",
    "EngineDeadError",
    "IncrementalDetokenizer",
    "InsufficientMemory",
    "LoadReport",
    "ModelNotFound",
    "ShardLMError",
    "WeightLoadError",
    "load_tokenizer",
]
