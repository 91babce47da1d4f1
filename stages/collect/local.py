"""Collect in this process: the main thread runs the model and does collect's own work on the rows where the
model left them (normalization, permutation, the fp16 cast: on a GPU, there), while a writer thread
summarizes, writes and commits the previous block."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from stages.collect.blocks import (
    HostStaging,
    MarkedBlock,
    Rows,
    estimate_normalization,
    fix_normalization,
    forward_block,
    mark_outliers,
    pending_blocks,
    prepare_rows,
    progress_bar,
    summarize_in,
)
from stages.collect.commits import ShardAlignedCommits
from stages.collect.config import CollectConfig
from stages.collect.context_tokens import ContextTokens
from store_schema.writer import StoreWriter

# Blocks handed to the writer thread and not yet written: two, so that the forward pass goes on while a
# commit writes the shards that two blocks filled (a sharded store commits every second block or so, and
# with one block in hand the forward pass waited behind each of those commits).
WRITER_BLOCKS = 2


def fill_store_here(cfg: CollectConfig, model, hooks: list[str], writer: StoreWriter) -> None:
    with ContextTokens.of_store(writer.group, writer.header) as tokens:
        todo = pending_blocks(cfg, writer)
        bar = progress_bar(cfg, tokens, todo)
        norms = writer.normalizations()
        # Host buffers for the blocks the writer thread has (WRITER_BLOCKS) and the one being filled.
        staging = HostStaging(slots=WRITER_BLOCKS + 1)
        # A block's statistics are summed while its rows are written, hooks side by side on up to one
        # thread per core (eight hooks' threads on 2 cores took 2.5 times the CPU for the same sums).
        stats_threads = max(1, min(len(hooks), os.cpu_count() or 1))
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="saepipe-writer") as pool,
            ThreadPoolExecutor(max_workers=stats_threads, thread_name_prefix="saepipe-stats") as stats_pool,
        ):
            pending: deque[Future] = deque()
            commits = ShardAlignedCommits(writer)
            for task in todo:
                block = forward_block(cfg, model, hooks, task, *tokens.read(task.contexts), bar.update)
                if norms is None:
                    norms = fix_normalization(writer, estimate_normalization(cfg, hooks, block))
                # The torch work stays on this thread: torch ops issued from a second thread start a second
                # OpenMP team, whose spinning threads slow the forward pass (docs/benchmarks.md); the writer's
                # share is numpy and I/O.
                marked = mark_outliers(block, norms, hooks)
                rows = prepare_rows(marked, cfg.seed, staging)
                while len(pending) >= WRITER_BLOCKS:
                    pending.popleft().result()  # bounded memory; writer errors surface here
                pending.append(pool.submit(_write_and_commit, commits, marked, rows, task.last_of_split, stats_pool))
            while pending:
                pending.popleft().result()
    bar.close()


def _write_and_commit(
    commits: ShardAlignedCommits, marked: MarkedBlock, rows: Rows, last_of_split: bool, stats_pool: Executor
) -> None:
    commits.add(marked.block.split, rows, last_of_split, summarize_in(stats_pool, marked, rows))
