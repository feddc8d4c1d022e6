"""One tensor-parallel rank: its device and process group, its slice of the model, its KV pool.

The driver calls, on every rank together: `init_device`, `load_model`, `profile_memory`,
`allocate_kv_cache`; then forward passes. Each returns plain data (msgspec Structs, tensors on
rank 0) so that it crosses a process boundary unchanged.
"""

from __future__ import annotations

import gc
import os
import socket

import msgspec
import torch

from parallel.errors import ModelNotFound
from parallel.state import TensorParallelGroup, destroy_tensor_parallel, init_tensor_parallel
from workers import sharded_state
from workers.batch import Batch, StepResult
from workers.config import EngineConfig
from workers.host_malloc import keep_freed_memory
from workers.kv_cache import KVCache, MemoryProfile, profile_memory
from workers.loader import WeightLoadReport, load_model
from workers.model_files import find_model
from workers.model_runner import ModelRunner
from workers.models.layers import AttentionMetadata
from workers.placeholders import LastTokens
from workers.progress import ProgressTracker, RankProgress
from workers.sleep_mode import HostCopy

COLLECTIVE_TIMEOUT_S = float(os.environ.get("SHARDLM_COLLECTIVE_TIMEOUT_S", "600"))


class Worker:
    """A rank of the engine."""

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device: torch.device | None = None
        self.tp: TensorParallelGroup | None = None
        self.model: torch.nn.Module | None = None
        self.kv_cache: KVCache | None = None
        self.runner: ModelRunner | None = None
        self.num_blocks = 0
        self.host_copy: HostCopy | None = None
        self.graph_bytes = 0
        """Device bytes of the decode step's CUDA graphs (0: none captured)."""
        """The weights in host memory while asleep at level 1."""
        self.progress = ProgressTracker(rank)
        """Where the start-up calls have got; read by `progress_snapshot` from another thread."""

    def init_device(self, address: str = "127.0.0.1", port: int = 0, cpu_threads: int | None = None) -> None:
        """Pick this rank's device (on CPU, with `cpu_threads` torch threads) and join the
        tensor-parallel process group."""
        keep_freed_memory()
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        if self.config.model.device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        self.tp = init_tensor_parallel(self.rank, self.world_size, address, port, backend, COLLECTIVE_TIMEOUT_S)

    def load_model(self) -> WeightLoadReport:
        """Build the model on the meta device and load this rank's weight slices."""
        if self.device is None:
            self.init_device()
        with self.progress.step("weights"):
            self.config = ensure_model_files(self.config, self.rank)
            self.model, report = load_model(self.config, self.tp, self.device, self.progress)
            self.progress.loaded()
        return report

    def profile_memory(self, local_ranks: int = 1, node_memory: int | None = None) -> MemoryProfile:
        """The bytes this rank can give the KV cache beside the largest step (on CUDA, measured
        around a forward of max_num_batched_tokens tokens; see `workers.kv_cache`)."""
        with self.progress.step("profile"):
            return profile_memory(self, local_ranks, node_memory)

    def allocate_kv_cache(self, num_blocks: int) -> int:
        """Allocate exactly `num_blocks` blocks per layer for K and for V; return the bytes taken."""
        with self.progress.step("kv_allocation"):
            self.kv_cache = KVCache.allocate(self.config, self.world_size, num_blocks, self.device)
            self.runner = ModelRunner(self.model, self.kv_cache, self.config, self.tp, self.device)
            self.last_tokens = LastTokens(self.tp, self.device)
        self.num_blocks = num_blocks
        return self.kv_cache.nbytes

    def capture_cuda_graphs(self) -> int:
        """The decode step's CUDA graphs, captured over the KV pool (warm-up phase); their bytes."""
        self.graph_bytes = self.runner.capture_graphs()
        return self.graph_bytes

    # -- sleep levels and sharded copies (see `workers.sleep_mode`, `workers.sharded_state`) ---

    def sleep(self, level: int) -> int:
        """Free the KV pool, and the weights' device memory (level 1: kept in host memory;
        level 2: dropped); the host bytes the weights then take."""
        self.kv_cache = self.runner = None
        if level == 1:
            self.host_copy = HostCopy(self.model)
        else:
            self.model = self.host_copy = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.host_copy.nbytes if self.host_copy is not None else 0

    def wake_up(self) -> WeightLoadReport | None:
        """Restore the weights (after level 2, loaded again through the pipeline: its report) and
        the same KV pool as before."""
        report = None
        if self.model is None:
            self.model, report = load_model(self.config, self.tp, self.device)
        elif self.host_copy is not None:
            self.host_copy.restore()
        self.host_copy = None
        self.allocate_kv_cache(self.num_blocks)
        if self.graph_bytes:  # the graphs held the old pool's and weights' addresses
            self.capture_cuda_graphs()
        return report

    def save_sharded_state(self, path: str, max_part_bytes: int | None = None) -> int:
        """Write this rank's final tensors as model-rank-{rank}-part-*.safetensors in `path`; how many files."""
        return len(sharded_state.save_rank(self.model, self.rank, path, max_part_bytes or sharded_state.MAX_PART_BYTES))

    def progress_snapshot(self) -> RankProgress:
        """Where this rank's start-up has got (safe to call while another thread loads)."""
        return self.progress.snapshot()

    def execute_model(self, batch: Batch) -> StepResult | None:
        """Run one engine step; rank 0 returns the sampled tokens, the others None. Placeholder
        tokens (a step scheduled before the one before it had sampled) are filled first."""
        batch = self.last_tokens.fill(batch)
        result = self.runner.execute(batch)
        self.last_tokens.record(batch, result)
        return result

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor] | None:
        """Logits [len(prompt), vocab] at every position of each prompt, in one batch (rank 0; None elsewhere)."""
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(len(p)) for p in prompts]).to(self.device)
        meta = AttentionMetadata(seq_lens=tuple(len(p) for p in prompts))
        logits = self.model.compute_logits(self.model(ids, positions, meta))
        return None if logits is None else [x.cpu() for x in logits.float().split([len(p) for p in prompts])]

    def greedy_continuation(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy next tokens by recomputing the whole sequence each step (one rank; no KV cache use yet)."""
        ids = list(prompt)
        for _ in range(max_new_tokens):
            token = int(self.prompt_logits([ids])[0][-1].argmax())
            ids.append(token)
            if stop_ids and token in stop_ids:
                break
        return ids[len(prompt) :]

    def shutdown(self) -> None:
        """Drop the model and the KV pool and leave the process group."""
        self.model = self.kv_cache = self.runner = None
        destroy_tensor_parallel(self.tp)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()


def ensure_model_files(config: EngineConfig, rank: int) -> EngineConfig:
    """The config with a model path this node can read: a Hub model missing here is fetched
    (under the same file lock as on the driver); a local path missing here is an error."""
    model = config.model
    if os.path.exists(model.path) or config.load.load_format == "dummy":
        return config
    if model.source != "hub":
        raise ModelNotFound(
            f"rank {rank} on node {socket.gethostname()} cannot see {model.path!r}: put the model on "
            "storage every node shares, or name it by its Hugging Face repo id so each node downloads it"
        )
    files = find_model(model.model, model.commit or model.revision, config.load.download_dir, config.load.load_format)
    tokenizer = files.folder if model.tokenizer == model.path else model.tokenizer
    new_model = msgspec.structs.replace(model, path=files.folder, tokenizer=tokenizer)
    return msgspec.structs.replace(
        config, model=new_model, load=msgspec.structs.replace(config.load, weight_files=files.weight_files)
    )
