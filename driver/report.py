"""The load report: what each phase of an engine start cost, and what each rank read."""

from __future__ import annotations

import msgspec

from workers.loader import WeightLoadReport

GIB = 2**30
MIB = 2**20


class LoadReport(msgspec.Struct, kw_only=True):
    """Seconds per phase of an engine start, in order, and every rank's weight-load report."""

    model: str
    phases: dict[str, float]
    ranks: list[WeightLoadReport]

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    def format(self) -> str:
        """A table for people."""
        lines = [f"engine start: {self.model}"]
        lines += [f"  {name:<12} {seconds:8.2f} s" for name, seconds in self.phases.items()]
        lines.append(f"  {'total':<12} {sum(self.phases.values()):8.2f} s")
        header = f"  {'rank':>4} {'format':>11} {'read MiB':>9} {'pages':>8} {'GB/s':>6} {'peak host MiB':>14} {'weights MiB':>12}"
        lines.append(header)
        for r in self.ranks:
            lines.append(
                f"  {r.rank:>4} {r.load_format:>11} {r.bytes_read / MIB:>9.1f} {r.pages_touched:>8} "
                f"{r.gb_per_s:>6.2f} {r.peak_host_bytes / MIB:>14.0f} {r.weight_device_bytes / MIB:>12.1f}"
            )
        if self.ranks:
            lines.append(f"  checkpoint: {self.ranks[0].checkpoint_bytes / MIB:.1f} MiB of tensors")
        return "\n".join(lines)
