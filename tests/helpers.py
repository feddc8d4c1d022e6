"""Checkpoints the tests write themselves with transformers, and transformers references."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
)
"""A tiny decoder: GQA (4 query heads, 2 kv heads), a vocabulary that is not a multiple of 64."""

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama", tie_word_embeddings=False),
    "llama_tied": dict(arch="llama", tie_word_embeddings=True),
    "llama_bias": dict(arch="llama", attention_bias=True, mlp_bias=True),
    "llama3_rope": dict(
        arch="llama",
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
        ),
    ),
    "llama_linear_rope": dict(arch="llama", rope_scaling=dict(rope_type="linear", factor=2.0)),
    "mistral": dict(arch="mistral", sliding_window=4096),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen2_untied": dict(arch="qwen2", tie_word_embeddings=False),
    "llama_8h4kv": dict(arch="llama", num_attention_heads=8, num_key_value_heads=4),
    "llama_8h2kv": dict(arch="llama", num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "llama_wide": dict(
        arch="llama",
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "llama_6h": dict(  # splits at tensor-parallel sizes 1, 2 and 3
        arch="llama",
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=6,
        num_key_value_heads=6,
    ),
    "llama_quant": dict(  # 4-bit tests: a row-parallel split of 256 or 512 inputs falls on groups of 128
        arch="llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}
FORMATS = ("safetensors", "sharded", "bin", "sharded_bin")


def hf_config(family: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    spec = dict(FAMILIES[family])
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[spec.pop("arch")]
    rope = spec.pop("rope_scaling", None)
    config = cls(**{**TINY, **spec})
    if rope is not None:
        theta = 10000.0
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = {"rope_theta": theta, **rope}
        else:
            config.rope_scaling, config.rope_theta = rope, theta
    return config


def hf_model(family: str, seed: int = 0) -> Any:
    """A randomly initialised transformers model, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 in transformers: make them informative
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.uniform_(0.5, 1.5) if "norm" in name else param.uniform_(-0.1, 0.1)
    return model.eval()


def write_checkpoint(model: Any, folder: Path, fmt: str) -> Path:
    """Save `model` as one safetensors file, sharded safetensors with an index, or .bin (one or sharded)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("safetensors", "sharded"):
        model.save_pretrained(folder, max_shard_size="60KB" if fmt == "sharded" else "10GB")
        return folder
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference_logits(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits for each prompt alone."""
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While transformers reads a GGUF file: parse it once, not once for the config and again
    for the weights, and build gguf's tensor-name map once, not once per tensor (together about
    17 of its 28 s here). Both are pure, so transformers' reading is unchanged."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}
    gguf.GGUFReader = lambda path, *args, **kwargs: readers.setdefault(str(path), reader(path, *args, **kwargs))
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf_to_safetensors(gguf_path: Path, folder: Path) -> Any:
    """Read a GGUF model with transformers (dequantized, float32) and save it as a safetensors
    folder with its tokenizer; returns the transformers model, the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    plain_config = type(hf.config).from_dict({k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"})
    plain_config.architectures = [type(hf).__name__]
    with torch.device("meta"):
        plain = type(hf)(plain_config)
    plain.load_state_dict(hf.state_dict(), assign=True)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf


def make_hub_cache(
    cache: Path, repo_id: str, source: Path, revision: str = "0123456789abcdef0123456789abcdef01234567", ref: str = "main"
) -> Path:
    """Lay `source`'s files out as huggingface_hub's cache does: blobs, snapshots/<rev>, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in source.iterdir():
        blob = repo / "blobs" / f"{file.name}.blob"
        blob.write_bytes(file.read_bytes())
        link = snapshot / file.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    return snapshot


BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_byte_tokenizer(checkpoint: Path, folder: Path) -> Path:
    """A copy of a tiny checkpoint with a tokenizer that fits TINY's vocabulary: the 256 bytes,
    then <|end|> (id 256, the end of sequence), and a chat template; for text prompts and chat."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(checkpoint, folder)
    byte_level = Tokenizer(
        models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|end|>")
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def greedy_ids(model: Any, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, `steps` tokens, no stop token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


PARAGRAPH = (
    "The history of the city began with a small fishing village on the river bank. Over the centuries it grew "
    "into a busy port, trading grain, wool and timber with towns along the coast, and its merchants built "
    "the stone houses that still line the old market square. "
)
SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time",
    "1, 2, 3, 4,",
    PARAGRAPH + "What did the merchants build?",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "The best way to learn a new language is",
    PARAGRAPH * 3 + "Summarise the text above in one sentence:",
    "import numpy as np\n\n",
    "Q: What is the boiling point of water?\nA:",
    "Roses are red,",
    PARAGRAPH * 2,
    "Translate to French: good morning",
    "The three laws of motion are",
    "My favourite food is",
    "In 1492,",
]
"""Sixteen prompts for SmolLM2: short and long (up to ~190 tokens), prose, code, chat, lists."""


def transformers_greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation, going on past end-of-sequence as ignore_eos does (its
    generate(min_new_tokens=...) would instead forbid end-of-sequence, another distribution)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    return out[0, len(ids) :].tolist()
