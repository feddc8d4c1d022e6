"""How many torch threads a CPU rank's step runs on: one for a step too small to split.

A step whose matrix products are small (a tiny model, or a few tokens of a small one) gains
nothing from a second OpenMP thread, and loses: each parallel region wakes the team's other
threads, which then spin-wait for the next region on a core the driver and the other ranks need
(on this 2-core machine a tiny Llama's batch-1 step through the engine took 0.81 - 0.90 ms with
two threads, 0.70 - 0.71 ms with one). So a step whose multiply-adds in its linear layers
(tokens x the rank's linear weight elements) come to fewer than `MIN_SPLIT_MACS` runs on one
thread, every other on the rank's own count; the count is put back after the step, so that
everything else (profiling, prompt logits) runs as before.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.layers import ParallelLinear, ParallelLMHead

MIN_SPLIT_MACS = 1 << 24
"""Below this many multiply-adds a step runs on one thread (a SmolLM2 token is 1.3e8 of them;
issue 11's tiny Llama's batch of 64, 5.5e6)."""


def linear_elements(model: nn.Module) -> int:
    """The weight elements of the rank's linear layers (their slices' rows x columns, whatever
    holds them: quantized layers keep packed codes) and LM head: multiply-adds per token."""
    total = 0
    for m in model.modules():
        if isinstance(m, ParallelLinear):
            total += m.local_out * m.local_in
        elif isinstance(m, ParallelLMHead):
            total += m.weight.numel()
    return total


class StepThreads:
    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.per_token = linear_elements(model) if device.type == "cpu" else 0
        """Multiply-adds per token (0: not a CPU rank, threads left alone)."""

    def narrow(self, tokens: int) -> int:
        """Go down to one thread when `tokens` x the per-token multiply-adds is small: the count to
        put back after the step (`restore`), or 0 when it was left as it was."""
        if not self.per_token or tokens * self.per_token >= MIN_SPLIT_MACS:
            return 0
        threads = torch.get_num_threads()
        if threads == 1:
            return 0
        torch.set_num_threads(1)
        return threads

    @staticmethod
    def restore(threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)
