"""Sleep levels of a rank (vLLM's): give the device back between jobs without ending the engine.

- Level 1: each parameter's values move to host memory (pinned on CUDA, so that waking copies at
  full bandwidth) and its device storage is freed; the KV pool is freed.
- Level 2: the parameters are dropped as well; waking reloads them through the load pipeline,
  from the checkpoint (or a sharded_state copy of it).

The parameters stay the same `nn.Parameter` objects throughout (only `.data` changes), so every
module that holds one, tied embeddings included, sees the restored values.
"""

from __future__ import annotations

import torch
from torch import nn


class HostCopy:
    """Level 1: the model's parameters in host memory while their device storage is free.

    On CPU the parameters are host memory already and stay where they are, unless `move` asks
    for the copy anyway (the tests check the CUDA path's logic that way).
    """

    def __init__(self, model: nn.Module, move: bool | None = None) -> None:
        self.device = next(model.parameters()).device
        self.params = list({id(p): p for p in model.parameters()}.values())
        self.moved = self.device.type != "cpu" if move is None else move
        pinned = self.device.type == "cuda"
        self.host: list[torch.Tensor] = []
        for p in self.params:
            if not self.moved:
                self.host.append(p.data)
                continue
            host = torch.empty(p.shape, dtype=p.dtype, pin_memory=pinned)
            host.copy_(p.data, non_blocking=pinned)
            self.host.append(host)
        if pinned:
            torch.cuda.synchronize(self.device)
        if self.moved:
            for p in self.params:
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        if pinned:
            torch.cuda.empty_cache()

    @property
    def nbytes(self) -> int:
        """Host bytes the copy holds (0 where nothing was moved)."""
        return sum(t.numel() * t.element_size() for t in self.host) if self.moved else 0

    def restore(self) -> None:
        """Put every parameter's values back on its device."""
        if self.moved:
            for p, host in zip(self.params, self.host):
                p.data = host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.host = []
