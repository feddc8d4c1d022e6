"""shardlm's public API."""

from driver.args import EngineArgs
from driver.llm import LLM
from driver.report import LoadReport
from driver.tokenizer import IncrementalDetokenizer, load_tokenizer
from parallel.errors import (
    ConfigError,
    EngineDeadError,
    ClusterError,
    InsufficientMemory,
    ModelNotFound,
    ShardLMError,
    WeightLoadError,
)

__all__ = [
    "ClusterError",
    "ConfigError",
    "EngineArgs",
    "EngineDeadError",
    "IncrementalDetokenizer",
    "LLM",
    "InsufficientMemory",
    "LoadReport",
    "ModelNotFound",
    "ShardLMError",
    "WeightLoadError",
    "load_tokenizer",
]
