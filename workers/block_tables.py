"""Each rank's copy of the sequences' block tables, kept between steps and updated in place from
the changes the driver sends (`TableUpdate`), so that a step's message carries only new block
ids, not every table.

The tables live in one int32 tensor, a row per sequence (rows are reused after a sequence
finishes; the tensor doubles when all are taken); a step gathers its sequences' rows, cut to
the longest table among them, with 0 (the null block) past each table's end, exactly what the
tables written out in full would give.
"""

from __future__ import annotations

import torch

from workers.batch import TableUpdate


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, rows: int = 64) -> None:
        self.width = max_blocks_per_seq
        self.table = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32)
        self.lists: list[list[int]] = [[] for _ in range(rows)]
        """Row r's block ids as a list: `table[r, :len(lists[r])]`."""
        self.row_of: dict[int, int] = {}
        self.free_rows = list(range(rows - 1, -1, -1))

    def apply(self, updates: list[TableUpdate], finished: list[int]) -> None:
        """Drop the finished sequences' tables, then write each update: `blocks` from index
        `start` on (start 0: the whole table, for a new or resumed sequence)."""
        for seq_id in finished:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.free_rows.append(row)
        for update in updates:
            row = self.row_of.get(update.seq_id)
            if row is None:
                row = self.row_of[update.seq_id] = self._take_row()
            stop = update.start + len(update.blocks)
            if stop > self.width:
                raise ValueError(f"sequence {update.seq_id}: {stop} blocks, more than the {self.width} a sequence may hold")
            if update.start == 0:
                self.table[row].zero_()
            elif update.start != len(self.lists[row]):
                raise ValueError(
                    f"sequence {update.seq_id}: blocks from {update.start} sent, but this rank holds {len(self.lists[row])}"
                )
            self.table[row, update.start : stop] = torch.tensor(update.blocks, dtype=torch.int32)
            if update.start == 0:
                self.lists[row] = list(update.blocks)
            else:
                self.lists[row].extend(update.blocks)

    def gather(self, seq_ids: list[int]) -> torch.Tensor:
        """[len(seq_ids), the longest of their tables] int32, 0 past each table's end."""
        rows = [self.row_of[s] for s in seq_ids]
        width = max((len(self.lists[r]) for r in rows), default=0)
        return self.table[:, :width].index_select(0, torch.tensor(rows, dtype=torch.long))

    def blocks_of(self, seq_id: int) -> list[int]:
        """A sequence's block ids (the list itself: read, do not change it)."""
        return self.lists[self.row_of[seq_id]]

    def _take_row(self) -> int:
        if not self.free_rows:
            old = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self.lists += [[] for _ in range(old)]
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self.free_rows.pop()
        self.table[row].zero_()
        self.lists[row] = []
        return row
