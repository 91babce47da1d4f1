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

from stages.collect.blocks import BlockSummary, Rows
from store_schema.writer import StoreWriter, WholeBlock


class _Carry:
    """A split's rows held back for the next commit: fewer than a shard's (a commit takes them as soon as
    they fill one). Rows of the block's own memory (on a CPU) are held as they are; rows in HostStaging's
    pinned buffers (from a GPU), which a later block fills again, are copied into buffers of one shard's
    rows, made once and reused (fresh arrays of a block's size cost their page faults at every block)."""

    def __init__(self, shard_rows: int):
        self.shard_rows, self.n = shard_rows, 0
        self.parts: list[Rows] = []
        self.buffers: Rows | None = None
        self.blocks: list[tuple[WholeBlock, int]] = []  # blocks not committed whole: (block, the row it ends at)

    def hold(self, rows: Rows) -> None:
        """Keep `rows` after the rows held."""
        if not len(rows):
            return
        if self.n + len(rows) > self.shard_rows:
            raise AssertionError(f"{self.n + len(rows):,} rows held, more than a shard's {self.shard_rows:,}")
        if rows.borrowed:
            rows = self._copied(rows)
        self.parts.append(rows)
        self.n += len(rows)

    def clear(self) -> None:
        self.parts, self.n = [], 0

    def _copied(self, rows: Rows) -> Rows:
        """`rows` copied into the buffers, at the place they take among the rows held."""
        if self.buffers is None:
            self.buffers = rows.empty_like(self.shard_rows)
        target = self.buffers.slice(self.n, self.n + len(rows))
        rows.copy_to(target)
        return target


class ShardAlignedCommits:
    """Writes and commits the blocks of a collect in order, on the writer's shard boundaries."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        self.unit = writer.header.shard_rows  # None: a commit per block
        self._carry: dict[str, _Carry] = {}
        self._failed = False

    def add(self, split: str, rows: Rows, last_of_split: bool, summary: Callable[[], BlockSummary]) -> None:
        """Take the split's next block: `rows` in stored order, and the call that gives its own statistics
        (summed while the rows are written). Write and commit what now fills whole shards, or everything
        when it is the split's last block. Once one call has failed, every later one refuses: what is held
        no longer follows the commits (blocks queued behind the failed one must not be written)."""
        if self._failed:
            raise RuntimeError("an earlier block's write or commit failed: the blocks after it are not written")
        try:
            self._add(split, rows, last_of_split, summary)
        except BaseException:
            self._failed = True
            raise

    def _add(self, split: str, rows: Rows, last_of_split: bool, summary: Callable[[], BlockSummary]) -> None:
        writer = self.writer
        done = writer.progress(split)
        if self.unit is None:
            rows.write(writer, split, done.block_rows)
            block = summary()
            writer.commit_block(split, block.index, block.n_rows, block.stats, block.dropped)
            return
        carry = self._carry.setdefault(split, _Carry(self.unit))
        start = carry.blocks[-1][1] if carry.blocks else done.block_rows
        if not carry.blocks:  # the first block since a commit of whole blocks, or since a resume
            rows = rows.slice(done.rows_committed - start, len(rows))  # its head may be committed already
        end = done.rows_committed + carry.n + len(rows)
        boundary = end if last_of_split else end - end % self.unit
        commit = boundary > done.rows_committed
        # the rows up to the boundary: those held, then this block's first (never fewer than held: a
        # boundary among them would have been committed with the block that brought them)
        take = boundary - done.rows_committed - carry.n if commit else 0
        if commit:
            Rows.write_run([*carry.parts, rows.slice(0, take)], writer, split, done.rows_committed)
        block = summary()
        carry.blocks.append((WholeBlock(block.index, block.n_rows, block.stats, block.dropped), start + block.n_rows))
        if commit:
            whole = [b for b, block_end in carry.blocks if block_end <= boundary]
            carry.blocks = [(b, block_end) for b, block_end in carry.blocks if block_end > boundary]
            writer.commit_blocks(split, whole, boundary)
            carry.clear()
        carry.hold(rows.slice(take, len(rows)))
        if last_of_split:
            del self._carry[split]  # its buffers with it
