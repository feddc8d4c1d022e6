"""The load report: what each phase of an engine start cost, and what each rank read."""

from __future__ import annotations

import msgspec

from driver.config.generation_defaults import GenerationDefaults
from workers.kv_cache import MemoryProfile
from workers.loader import WeightLoadReport

GIB = 2**30
MIB = 2**20


class LoadReport(msgspec.Struct, kw_only=True):
    """Seconds per phase of an engine start, in order, and what each rank read and holds."""

    model: str
    phases: dict[str, float]
    ranks: list[WeightLoadReport]
    memory: list[MemoryProfile] = []
    """Each rank's memory profile (empty when no KV cache was sized)."""
    num_blocks: int = 0
    """KV-cache blocks every rank allocated."""
    block_size: int = 0
    kv_cache_bytes: list[int] = []
    """Bytes each rank's KV pool takes."""
    nodes: list[str] = []
    """The Ray node each rank ran on."""
    connect_seconds: float = 0.0
    """Joining Ray, or starting a local cluster: part of `LLM(...)`, but not of the engine's
    phases (nor of their total)."""
    generation_defaults: GenerationDefaults | None = None
    """The sampling defaults in force where a request does not set its own (set by `LLM`)."""
    step_dispatch: str = ""
    """How each step reaches the ranks: "compiled graph" or "plain calls"."""
    cuda_graph_bytes: list[int] = []
    """Per rank, the device bytes of the decode step's CUDA graphs ([]: eager steps)."""

    @property
    def token_capacity(self) -> int:
        """Tokens the KV pool holds (per rank: each holds its heads of every token)."""
        return self.num_blocks * self.block_size

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    def format(self) -> str:
        """A table for people."""
        lines = [f"engine start: {self.model}"]
        lines += [f"  {name:<12} {seconds:8.2f} s" for name, seconds in self.phases.items()]
        lines.append(f"  {'total':<12} {sum(self.phases.values()):8.2f} s")
        if self.connect_seconds:
            note = "joining Ray or starting a local cluster (discover overlaps it)"
            lines.append(f"  {'ray':<12} {self.connect_seconds:8.2f} s  {note}")
        header = (
            f"  {'rank':>4} {'format':>11} {'read MiB':>9} {'pages':>8} {'GB/s':>6} {'peak host MiB':>14} "
            f"{'weights MiB':>12} {'KV MiB':>8}"
        )
        lines.append(header)
        for i, r in enumerate(self.ranks):
            kv = self.kv_cache_bytes[i] / MIB if i < len(self.kv_cache_bytes) else 0.0
            lines.append(
                f"  {r.rank:>4} {r.load_format:>11} {r.bytes_read / MIB:>9.1f} {r.pages_touched:>8} "
                f"{r.gb_per_s:>6.2f} {r.peak_host_bytes / MIB:>14.0f} {r.weight_device_bytes / MIB:>12.1f} {kv:>8.1f}"
            )
        if self.ranks:
            lines.append(f"  checkpoint: {self.ranks[0].checkpoint_bytes / MIB:.1f} MiB of tensors")
        if self.num_blocks:
            lines.append(
                f"  KV cache: {self.num_blocks} blocks of {self.block_size} tokens per rank = {self.token_capacity} tokens"
            )
        commits = {r.commit for r in self.ranks if r.commit}
        if commits:
            lines.append(f"  Hub commit: {', '.join(sorted(commits))}" + ("" if len(commits) == 1 else "  (ranks differ!)"))
        packed = sum(r.packed_bytes for r in self.ranks)
        if packed:
            lines.append(f"  linear weights packed for oneDNN: {packed / MIB:.1f} MiB beside the weights, all ranks")
        if self.step_dispatch:
            lines.append(f"  steps: {self.step_dispatch}")
        if self.generation_defaults is not None:
            lines.append(f"  {self.generation_defaults.describe()}")
        return "\n".join(lines)
