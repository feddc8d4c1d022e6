"""The resolved engine configuration: frozen msgspec Structs built once by the driver.

`driver.EngineArgs` validates what the user asked for and resolves it into an `EngineConfig`,
which travels whole to every rank. Nobody writes results back into it: what a phase measures
goes into a report of its own.
"""

from __future__ import annotations

import msgspec

from parallel.quantization import QuantConfig


class RopeScaling(msgspec.Struct, frozen=True, kw_only=True):
    """How rotary frequencies are rescaled for long contexts (Hugging Face's `rope_scaling`)."""

    rope_type: str = "default"
    """"default" (none), "linear" (positions divided by factor) or "llama3" (per-frequency)."""
    factor: float = 1.0
    """The context extension factor."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained at."""


class ModelArch(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of a Llama-family decoder, read from the checkpoint's config."""

    architecture: str
    """The `architectures` entry that chose the model class, e.g. "LlamaForCausalLM"."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (fewer than num_heads under grouped-query attention)."""
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    """Bias on the q, k and v projections (Qwen2; Llama with attention_bias)."""
    o_bias: bool = False
    """Bias on the output projection (Llama with attention_bias)."""
    mlp_bias: bool = False


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Which model, where its files are, and how to run it."""

    model: str
    """The model as the user named it (folder, repo id, .gguf path), or "" for the embedded default."""
    source: str
    """Where it was found: "folder", "hub", "gguf" or "default"."""
    path: str
    """The local folder holding config.json (or the .gguf file) on the node that resolved it."""
    gguf_file: str | None = None
    """The GGUF file's name inside `path`, for GGUF models."""
    revision: str | None = None
    """The Hugging Face revision (branch, tag or commit) for repo ids, as asked."""
    commit: str | None = None
    """The commit a Hub model's revision resolved to on the driver: every rank loads exactly it."""
    tokenizer: str
    """Folder or repo id of the tokenizer (the model's own unless given)."""
    tokenizer_revision: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    dtype: str
    """The resolved compute dtype: "float32", "bfloat16" or "float16"."""
    device: str
    """"cuda" or "cpu"."""
    max_model_len: int
    """The longest sequence (prompt plus output) the engine accepts."""
    seed: int = 0
    enforce_eager: bool = False
    quantization: QuantConfig | None = None
    """How the decoder's linear layers hold their weights (None: in `dtype`)."""
    arch: ModelArch


class LoadConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How weights are read."""

    load_format: str
    """The resolved format: "safetensors", "pt", "gguf" or "dummy"."""
    weight_files: tuple[str, ...] = ()
    """Weight files, relative to ModelConfig.path, in load order."""
    download_dir: str | None = None
    """The Hugging Face cache folder for repo ids (None: huggingface_hub's default)."""
    strategy: str = "auto"
    """How files are read: "auto", "page_cache" or "direct" (`workers.load_pipeline`)."""
    threads: int | None = None
    """Reader threads per rank (None: chosen from the device and its CPU threads)."""


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How each rank sizes its paged KV cache."""

    block_size: int = 16
    kv_cache_dtype: str = "auto"
    """"auto" (the model dtype) or "fp8" (float8 e4m3 with a scale per layer)."""
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes other requests computed (driver/engine/block_manager.py)."""


class ParallelConfig(msgspec.Struct, frozen=True, kw_only=True):
    tensor_parallel_size: int = 1


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    async_scheduling: bool = False


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a rank needs to know, in one message."""

    model: ModelConfig
    load: LoadConfig
    cache: CacheConfig
    parallel: ParallelConfig
    scheduler: SchedulerConfig
