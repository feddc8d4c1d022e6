"""shardlm's public API."""

from driver.args import EngineArgs
from driver.llm import LLM
from driver.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from driver.report import LoadReport
from driver.tokenizer import IncrementalDetokenizer, load_tokenizer
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

__all__ = [
    "ClusterError",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
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
