"""Commits that end on the store's shard boundaries, so that every shard file is written once.

A sharded store (`layout.shard_rows`) keeps many chunks to a file, and a file is written whole: a commit
that ended inside a shard would have the next one read the shard back and write it again. So the rows of
finished blocks are held until they fill whole shards, and each commit writes and makes visible the
whole shards so far (a split's last commit, its rest). A commit can thus end inside a block: its rows up
to the boundary are committed (the block's head), its statistics and skipped contexts only when the
block is committed whole (`SplitProgress.rows_in_blocks`). A killed collect resumes at that block,
computes it again (the same rows: a block depends only on the seed and its index) and carries on
after its committed head, which nobody writes again; its sums are merged a block at a time as
before, so the store ends bit-identical to an uninterrupted one.

An unsharded store commits every block as it comes, as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stages.collect.blocks import BlockSummary, Rows
from store_schema.writer import StoreWriter, WholeBlock


@dataclass
class _Held:
    """A split's rows written by no commit yet, and the blocks they finish or begin."""

    rows: list[Rows] = field(default_factory=list)  # in order, after the committed rows
    blocks: list[tuple[WholeBlock, int]] = field(default_factory=list)  # (block, the row it ends at)

    @property
    def n_rows(self) -> int:
        return sum(len(part) for part in self.rows)


class ShardAlignedCommits:
    """Writes and commits the blocks of a collect in order, on the writer's shard boundaries."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        self.unit = writer.header.shard_rows  # None: a commit per block
        self._held = {}

    def add(self, split: str, rows: Rows, last_of_split: bool, summary: Callable[[], BlockSummary]) -> None:
        """Take the split's next block: `rows` in stored order, and the call that gives its own statistics
        (summed while the rows are written). Write and commit what now fills whole shards, or everything
        when it is the split's last block."""
        writer = self.writer
        done = writer.progress(split)
        if self.unit is None:
            rows.write(writer, split, done.block_rows)
            block = summary()
            writer.commit_block(split, block.index, block.n_rows, block.stats, block.dropped)
            return
        held = self._held.setdefault(split, _Held())
        start = held.blocks[-1][1] if held.blocks else done.block_rows
        if not held.blocks:  # the first block since a commit of whole blocks, or since a resume
            rows = rows.slice(done.rows_committed - start, len(rows))  # its head may be committed already
        end = done.rows_committed + held.n_rows + len(rows)
        held.rows.append(rows)
        boundary = end if last_of_split else end - end % self.unit
        if boundary > done.rows_committed:
            self._write(split, held, done.rows_committed, boundary)
        block = summary()
        held.blocks.append((WholeBlock(block.index, block.n_rows, block.stats, block.dropped), start + block.n_rows))
        if boundary > done.rows_committed:
            whole = [block for block, block_end in held.blocks if block_end <= boundary]
            held.blocks = [(block, block_end) for block, block_end in held.blocks if block_end > boundary]
            writer.commit_blocks(split, whole, boundary)
        if len(rows) and end > max(boundary, done.rows_committed):
            # this block's rows still held must outlive its host buffer (HostStaging reuses it); those of
            # earlier blocks are copies already
            last = held.rows[-1]
            held.rows[-1] = last.slice(0, len(last), copy=True)

    def _write(self, split: str, held: _Held, committed: int, boundary: int) -> None:
        """Write rows [committed, boundary) of those `held`, which keeps the rest."""
        parts, rest, row = [], [], committed
        for part in held.rows:
            take = max(0, min(len(part), boundary - row))
            if take:
                parts.append(part.slice(0, take))
            if take < len(part):
                rest.append(part.slice(take, len(part)))
            row += len(part)
        Rows.concat(parts).write(self.writer, split, committed)
        held.rows = rest
