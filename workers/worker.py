"""One tensor-parallel rank: its device, its slice of the model, and forward passes over it."""

from __future__ import annotations

import torch

from parallel.state import TensorParallelGroup
from workers.config import EngineConfig
from workers.loader import WeightLoadReport, load_model
from workers.models.layers import AttentionMetadata


class Worker:
    """A rank of the engine. The driver calls `init_device`, then `load_model`, then runs it."""

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device: torch.device | None = None
        self.tp: TensorParallelGroup | None = None
        self.model: torch.nn.Module | None = None

    def init_device(self) -> None:
        """Pick this rank's device and join its tensor-parallel group."""
        if self.config.model.device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size != 1:
            raise NotImplementedError("multi-rank groups are set up by the cluster layer")
        self.tp = TensorParallelGroup.single()

    def load_model(self) -> WeightLoadReport:
        """Build the model on the meta device and load this rank's weight slices."""
        if self.device is None:
            self.init_device()
        self.model, report = load_model(self.config, self.tp, self.device)
        return report

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor] | None:
        """Logits [len(prompt), vocab] at every position of each prompt, in one batch (rank 0; None elsewhere)."""
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(len(p)) for p in prompts]).to(self.device)
        meta = AttentionMetadata(seq_lens=tuple(len(p) for p in prompts))
        logits = self.model.compute_logits(self.model(ids, positions, meta))
        return None if logits is None else list(logits.float().split([len(p) for p in prompts]))

    def greedy_continuation(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy next tokens by recomputing the whole sequence each step (no KV cache yet)."""
        ids = list(prompt)
        for _ in range(max_new_tokens):
            token = int(self.prompt_logits([ids])[0][-1].argmax())
            ids.append(token)
            if stop_ids and token in stop_ids:
                break
        return ids[len(prompt) :]
