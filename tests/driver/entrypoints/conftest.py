"""Fixtures of the Serve tests: SmolLM2's tokenizer, and a tiny Llama that carries it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from driver.config.args import EngineArgs
from tests.helpers import hf_config

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def tokenizer(smollm2_gguf: Path) -> Any:
    from driver.engine.tokenizer import load_tokenizer

    return load_tokenizer(EngineArgs(model=str(smollm2_gguf)).create_engine_config(device="cpu").model)


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny Llama (8 heads, 4 KV heads: splits in two) over SmolLM2's vocabulary, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    config = hf_config("llama_8h4kv")
    config.vocab_size, config.max_position_embeddings = len(tokenizer), MAX_MODEL_LEN
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-chat")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
