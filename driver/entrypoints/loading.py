"""Bringing up the model in this process, at one rank, without Ray: config, weights, tokenizer,
timed. For checking the model against a reference and for debugging; `driver.LLM` is the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from driver.config.args import EngineArgs
from driver.engine.report import LoadReport
from driver.engine.tokenizer import load_tokenizer
from parallel.errors import ConfigError
from workers.config import EngineConfig
from workers.worker import Worker


@dataclass
class LoadedModel:
    config: EngineConfig
    worker: Worker
    tokenizer: Any
    report: LoadReport

    def greedy(self, prompt: str, max_tokens: int) -> str:
        """Greedy continuation of `prompt` (recomputed each step: there is no KV cache yet)."""
        ids = self.tokenizer(prompt)["input_ids"]
        eos = self.tokenizer.eos_token_id
        out = self.worker.greedy_continuation(ids, max_tokens, stop_ids={eos} if eos is not None else None)
        return self.tokenizer.decode(out, skip_special_tokens=True)


def load_in_process(args: EngineArgs) -> LoadedModel:
    """Resolve `args`, load the weights at one rank and set up the tokenizer; report each phase."""
    if args.tensor_parallel_size != 1:
        raise ConfigError("load_in_process runs one rank; use driver.LLM for tensor_parallel_size > 1")
    phases: dict[str, float] = {}
    start = time.perf_counter()
    config = args.create_engine_config()
    phases["discover"] = time.perf_counter() - start
    worker = Worker(config)
    worker.init_device()
    weights = worker.load_model()
    phases["weights"] = weights.seconds
    start = time.perf_counter()
    tokenizer = None if config.model.skip_tokenizer_init else load_tokenizer(config.model)
    phases["tokenizer"] = time.perf_counter() - start
    report = LoadReport(model=config.model.model or f"default ({config.model.gguf_file})", phases=phases, ranks=[weights])
    return LoadedModel(config, worker, tokenizer, report)
