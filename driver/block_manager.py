"""The KV-cache block manager: a free list, and each sequence's block table grown as it grows."""

from __future__ import annotations

from collections import deque
from typing import Protocol


class HasBlocks(Protocol):
    block_table: list[int]


class BlockManager:
    """Hands out blocks 1 .. num_blocks of every rank's pool (all ranks hold the same layout;
    block 0 is the null block, never handed out).

    Invariant: a block is either free or in exactly one sequence's table.
    """

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 1) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(first_block, first_block + num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq: HasBlocks, num_tokens: int) -> bool:
        """Whether `seq`'s table can be made to hold `num_tokens` tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: HasBlocks, num_tokens: int) -> None:
        """Append blocks to `seq`'s table until it holds `num_tokens` tokens."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed > self.num_free:
            raise RuntimeError(f"{needed} blocks asked for, {self.num_free} free: check can_grow first")
        seq.block_table.extend(self.free_blocks.popleft() for _ in range(max(0, needed)))

    def release(self, seq: HasBlocks) -> None:
        """Return all of `seq`'s blocks (it finished, or was preempted)."""
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
