"""The KV-cache block manager: a free list, each sequence's block table grown as it grows, and the
prefix cache, which lets a sequence start from blocks another sequence already computed.

Prefix caching (on by default, as in vLLM V1). A full block is keyed by a hash of its tokens
and of the key of the block before it, so a key names the whole prefix up to the block's end.
Blocks carry reference counts: the sequences whose tables hold them. A block no table holds is
free, but keeps its key and contents until it is handed out again; the free list is in least
recently used order, and handing out its head evicts that block from the cache. A sequence
admitted (or resumed after preemption) first takes the cached blocks of its longest cached
prefix, then fresh ones; its last token is always computed, for its logits.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Protocol


class HasBlocks(Protocol):
    block_table: list[int]
    block_hashes: list[bytes]

    @property
    def num_tokens(self) -> int: ...

    def token_slice(self, start: int, stop: int) -> list[int]: ...


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The cache key of a full block: its tokens after the key of the prefix before it."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Hands out blocks 1 .. num_blocks of every rank's pool (all ranks hold the same layout;
    block 0 is the null block, never handed out).

    Invariants: a block is either free or held by the tables of `ref_counts[block]` sequences,
    never both; a key in the cache names one block, whose contents are that key's tokens.
    """

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 1, enable_prefix_caching: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(first_block, first_block + num_blocks))
        self.ref_counts: dict[int, int] = {}
        self.cached: dict[bytes, int] = {}
        """Key -> the block holding it."""
        self.key_of: dict[int, bytes] = {}
        self.queried_tokens = 0
        """Tokens of admitted sequences that were looked up in the cache."""
        self.hit_tokens = 0
        """Of those, the tokens found there (not computed)."""

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission --------------------------------------------------------------------------

    def cached_prefix(self, seq: HasBlocks) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix, short of its last token (for a
        sequence that holds no blocks)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        count = (seq.num_tokens - 1) // self.block_size
        for key in self._ensure_keys(seq, count)[:count]:
            block = self.cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def can_take(self, seq: HasBlocks, prefix: list[int], num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens starting from the cached `prefix`."""
        reused_free = sum(1 for b in prefix if b in self.free_blocks)
        return self.blocks_for(num_tokens) - len(prefix) <= self.num_free - reused_free

    def take(self, seq: HasBlocks, prefix: list[int]) -> int:
        """Give `seq` (holding no blocks) the cached `prefix`; the tokens it need not compute."""
        for block in prefix:
            self._ref(block)
        seq.block_table = list(prefix)
        if self.enable_prefix_caching:
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += len(prefix) * self.block_size
        return len(prefix) * self.block_size

    # -- growth -----------------------------------------------------------------------------

    def can_grow(self, seq: HasBlocks, num_tokens: int) -> bool:
        """Whether `seq`'s table can be made to hold `num_tokens` tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: HasBlocks, num_tokens: int) -> None:
        """Append blocks to `seq`'s table until it holds `num_tokens` tokens."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed > self.num_free:
            raise RuntimeError(f"{needed} blocks asked for, {self.num_free} free: check can_grow first")
        for _ in range(max(0, needed)):
            block, _ = self.free_blocks.popitem(last=False)
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.cached[key]  # evicted: the least recently used free block
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def computed(self, seq: HasBlocks, start: int, stop: int) -> None:
        """`seq`'s tokens [start, stop) are now in its blocks: cache the blocks that became full."""
        if not self.enable_prefix_caching:
            return
        first, last = start // self.block_size, stop // self.block_size
        if first == last:
            return  # no block became full (most decode steps)
        keys = self._ensure_keys(seq, last)
        for index in range(first, last):
            key = keys[index]
            if key not in self.cached:
                block = seq.block_table[index]
                self.cached[key] = block
                self.key_of[block] = key

    # -- release ----------------------------------------------------------------------------

    def release(self, seq: HasBlocks) -> None:
        """Return all of `seq`'s blocks (it finished, or was preempted). Cached ones stay in the
        cache until handed out again; a sequence's last blocks are evicted before its first."""
        for block in reversed(seq.block_table):
            count = self.ref_counts[block] - 1
            if count:
                self.ref_counts[block] = count
            else:
                del self.ref_counts[block]
                self.free_blocks[block] = None
        seq.block_table = []

    def stats(self) -> dict[str, float]:
        return {
            "prefix_cache_queries": self.queried_tokens,
            "prefix_cache_hits": self.hit_tokens,
            "prefix_cache_hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0,
            "cached_blocks": self.num_cached,
        }

    def _ref(self, block: int) -> None:
        if block in self.free_blocks:
            del self.free_blocks[block]
            self.ref_counts[block] = 1
        else:
            self.ref_counts[block] += 1

    def _ensure_keys(self, seq: HasBlocks, count: int) -> list[bytes]:
        """`seq`'s block keys, at least its first `count` (kept on the sequence: its tokens never change)."""
        keys, bs = seq.block_hashes, self.block_size
        while len(keys) < count:
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else b"", seq.token_slice(i * bs, (i + 1) * bs)))
        return keys
