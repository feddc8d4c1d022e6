"""The tokens a step was scheduled without (async scheduling).

With async scheduling the driver sends step N+1 before step N's result has come back, so a
completion that samples in step N gets a placeholder (`PLACEHOLDER`) as its input token in step
N+1. Rank 0 sampled that token and keeps it here; it fills the placeholders and gives the other
ranks the same tokens through one all-reduce of the filled values (rank 0's values, zeros
elsewhere), so every rank embeds the same ids.
"""

from __future__ import annotations

import msgspec
import torch

from parallel.state import TensorParallelGroup
from workers.batch import PLACEHOLDER, Batch, StepResult


class LastTokens:
    """Each sequence's last sampled token (rank 0), to fill a batch's placeholders on every rank."""

    def __init__(self, tp: TensorParallelGroup, device: torch.device) -> None:
        self.tp, self.device = tp, device
        self.last: dict[int, int] = {}

    def fill(self, batch: Batch) -> Batch:
        """`batch` with its placeholders replaced by the tokens they stand for. A placeholder is
        always a one-token row's token (a completion's next decode), and those rows come first,
        so the placeholder at token index i is row i's, sequence `seq_ids[i]`'s."""
        ids = batch.token_ids
        if PLACEHOLDER not in ids:
            return batch
        holes = [i for i, token in enumerate(ids[: batch.num_decodes]) if token == PLACEHOLDER]
        values = [0] * len(holes)
        if self.tp.rank == 0:
            try:
                values = [self.last[batch.seq_ids[i]] for i in holes]
            except KeyError as exc:
                raise RuntimeError(f"a placeholder token for sequence {exc.args[0]}, which has sampled nothing yet") from None
        if self.tp.size > 1:  # token ids below 2**24 are exact in float32
            values = self.tp.all_reduce(torch.tensor(values, dtype=torch.float32, device=self.device)).cpu().tolist()
        ids = list(ids)
        for i, value in zip(holes, values):
            ids[i] = int(value)
        return msgspec.structs.replace(batch, token_ids=ids)

    def record(self, batch: Batch, result: StepResult | None) -> None:
        """Keep what this step sampled; forget the sequences that finished."""
        for seq_id in batch.finished_seq_ids:
            self.last.pop(seq_id, None)
        if result is not None:
            for token in result.sampled:
                self.last[token.seq_id] = token.token_id
