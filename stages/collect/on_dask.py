"""Collect across dask.distributed workers (`saepipe collect --workers N` or `--scheduler ADDRESS`).

The client (this process) holds the store lock, packs the text, creates or opens the store, and commits.
Workers load the model once each and run the per-block steps of `stages.collect` (forward, normalize,
prepare) on blocks handed out in turn; a block's fp16 rows stay on its worker, and the client only
receives the block's summary (row count and its own statistics).

Writing. A block's first row is known once every earlier block's row count is known, so the client
places blocks in order. The rows then go straight from the workers into the store, and every chunk is
written by exactly one task: the whole chunks a block fills alone by a task on its worker, and a chunk
shared by neighbouring blocks (blocks are not chunk-aligned) by one task that receives the pieces of
each block. No two tasks ever write one chunk, so no read-modify-write can lose another's rows, and a
task run twice (a worker lost) writes the same bytes again. Blocks are committed strictly in order,
their statistics merged in that order, which makes the store bit-identical to a single-process collect
with the same settings; a collect interrupted either way resumes either way.

At most two blocks per worker thread are in flight, which bounds the workers' memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.collect.blocks import (
    Block,
    BlockSummary,
    BlockTask,
    PreparedBlock,
    Rows,
    estimate_normalization,
    fix_normalization,
    forward_block,
    mark_outliers,
    pending_blocks,
    prepare_block,
    progress_bar,
)
from stages.collect.config import CollectConfig
from stages.collect.context_tokens import ContextTokens
from stages.host_model.loading import load_host_model
from stages.host_model.model import HostModel, validate_hooks
from stages.host_model.tokenizers import TextTokenizer
from store_schema import schema
from store_schema.lock import lock_path
from store_schema.normalization import Normalization
from store_schema.writer import StoreWriter

# dask.distributed is imported where a cluster is used (--workers, --scheduler), in the client and in
# the workers' tasks: a collect in one process never needs it, and importing it configures logging.
if TYPE_CHECKING:
    from distributed import Client, Future

_IN_FLIGHT_PER_THREAD = 2
_STOP_WAIT_S = 120
_HIGH = 1  # dask priority of everything after a forward pass: finish blocks before starting new ones


# -- the cluster ------------------------------------------------------------------------------------
@contextmanager
def connect(cfg: CollectConfig) -> Iterator[Client]:
    """A dask Client: of a local cluster of `cfg.workers` processes, or of the one at `cfg.scheduler`."""
    from distributed import Client, LocalCluster

    if cfg.scheduler is not None:
        try:
            client = Client(cfg.scheduler)
        except (OSError, TimeoutError, ValueError) as e:
            raise SaepipeError(
                f"cannot reach the dask scheduler at {cfg.scheduler} ({type(e).__name__}: {e}): "
                f"start one (`dask scheduler`) or correct --scheduler"
            ) from None
        with client:
            if not client.nthreads():
                print(
                    f"waiting for a worker to join the scheduler at {cfg.scheduler} (e.g. `dask worker "
                    f"{cfg.scheduler}`)",
                    file=sys.stderr,
                )
                client.wait_for_workers(1)
            print(f"collecting on the {len(client.nthreads())} dask workers of {cfg.scheduler}", file=sys.stderr)
            yield client
        return
    # One thread per worker (one model, one forward at a time); torch threads share the cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // cfg.workers))
    print(f"starting a local dask cluster of {cfg.workers} worker processes", file=sys.stderr)
    with (
        LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
            env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def worker_device(device: str, worker_name, n_gpus: int) -> str:
    """The device a worker runs the model on. A local cluster (`--workers N`) names its workers 0..N-1:
    with --device auto or cuda on a node with several GPUs, worker i takes GPU i mod the GPU count, so
    the workers share the GPUs instead of all using the first. Any other worker (one that sees one GPU
    through CUDA_VISIBLE_DEVICES, as dask-cuda sets it) and any named device keep --device."""
    if device in ("auto", "cuda") and n_gpus > 1 and isinstance(worker_name, int):
        return f"cuda:{worker_name % n_gpus}"
    return device


# -- on the workers ---------------------------------------------------------------------------------
_model_lock = threading.Lock()
_model: tuple[tuple[str, str, str], HostModel] | None = None  # ((name, device, dtype), model): one per worker process


def _worker_model(cfg: CollectConfig) -> HostModel:
    """The host model of this worker process, loaded on its first task and kept for the next ones."""
    global _model
    from distributed import get_worker

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    key = (cfg.model, worker_device(cfg.device, get_worker().name, n_gpus), cfg.dtype)
    with _model_lock:
        if _model is None or _model[0] != key:
            _model = None  # let the old one go before loading another
            _model = (key, load_host_model(*key))
        return _model[1]


@dataclass
class WorkerModelSummary:
    """What the client needs to know of the model, which only the workers load: the HostModel facts that
    run_collect and create_store read, for `hooks` only."""

    name: str
    revision: str
    d_model: int
    n_layers: int
    tokenizer: TextTokenizer
    hooks: list[str]
    n_ctx: int  # the longest context the model takes
    hook_widths: dict[str, int]
    forward: str  # HostModel.forward_path(hooks): the forward pass that serves them on the workers

    @classmethod
    def of(cls, model: HostModel, hooks: list[str]) -> WorkerModelSummary:
        return cls(
            name=model.name,
            revision=model.revision,
            d_model=model.d_model,
            n_layers=model.n_layers,
            tokenizer=model.tokenizer,
            hooks=hooks,
            n_ctx=model.n_ctx,
            hook_widths={hook: model.hook_width(hook) for hook in hooks},
            forward=model.forward_path(hooks),
        )

    # HostModel's methods, as create_store calls them; answered for the summarized hooks only, as the
    # forward path of other hooks may differ and only the workers' model knows it.
    def hook_width(self, hook: str) -> int:
        return self.hook_widths[hook]

    def forward_path(self, hooks: list[str]) -> str:
        if set(hooks) != set(self.hooks):
            raise ValueError(f"the workers' model was summarized for hooks {self.hooks}, not {list(hooks)}")
        return self.forward


def _describe(cfg: CollectConfig) -> WorkerModelSummary:
    model = _worker_model(cfg)
    return WorkerModelSummary.of(model, validate_hooks(model, list(cfg.hooks)))


def _model_for(cfg: CollectConfig, revision: str) -> HostModel:
    """The worker's model, checked to be the weights the store was started with."""
    model = _worker_model(cfg)
    if model.revision != revision:
        from distributed import get_worker

        raise SaepipeError(
            f"dask worker {get_worker().address} loaded other weights of {cfg.model} (revision "
            f"{model.revision}, the store's is {revision}): give every worker the same model files"
        )
    return model


def _forward(
    cfg: CollectConfig, hooks: list[str], revision: str, task: BlockTask, tokens: np.ndarray, keep: np.ndarray
) -> Block:
    return forward_block(cfg, _model_for(cfg, revision), hooks, task, tokens, keep).to_host()  # travels


def _prepare(cfg: CollectConfig, hooks: list[str], block: Block, norms: dict[str, Normalization]) -> PreparedBlock:
    return prepare_block(mark_outliers(block, norms, hooks), cfg.seed)


def _collect_block(
    cfg: CollectConfig,
    hooks: list[str],
    revision: str,
    task: BlockTask,
    tokens: np.ndarray,
    keep: np.ndarray,
    norms: dict[str, Normalization],
) -> PreparedBlock:
    return _prepare(cfg, hooks, _forward(cfg, hooks, revision, task, tokens, keep), norms)


def _summary(prepared: PreparedBlock) -> BlockSummary:
    return prepared.summary


def _piece(prepared: PreparedBlock, lo: int, hi: int) -> Rows:
    return prepared.rows.slice(lo, hi, copy=True)  # a copy: the piece travels without the whole block


def _write_block_rows(store: str, lock: str, split: str, start: int, prepared: PreparedBlock, lo: int, hi: int) -> None:
    _write(store, lock, split, start, prepared.rows.slice(lo, hi))


def _write_pieces(store: str, lock: str, split: str, start: int, pieces: list[Rows]) -> None:
    _write(store, lock, split, start, Rows.concat(pieces))


def _write(store: str, lock: str, split: str, start: int, rows: Rows) -> None:
    if not _holds_lock(store, lock):
        # The collect that sent this task is gone (its lock released or taken over): a late write could
        # race with the collect that resumes the store.
        raise SaepipeError(f"the collect that scheduled this write no longer holds {lock_path(store)}: not writing")
    rows.write(StoreWriter.open(store), split, start)


def _holds_lock(store: str, lock: str) -> bool:
    try:
        return lock_path(store).read_text() == lock
    except OSError:
        return False


# -- on the client ----------------------------------------------------------------------------------
def describe_model(client: Client, cfg: CollectConfig) -> WorkerModelSummary:
    """Load the model on a worker (where it stays for that worker's blocks) and report it."""
    return client.submit(_describe, cfg, key=f"saepipe-describe-{uuid.uuid4().hex[:8]}").result()


def fill_store_on_workers(
    cfg: CollectConfig, client: Client, writer: StoreWriter, model_summary: WorkerModelSummary
) -> None:
    """Collect every block the store still lacks on the client's workers; the client commits them."""
    store = str(Path(cfg.out).resolve())  # workers may run elsewhere, in another folder
    lock = _check_workers_see_store(client, store)
    with ContextTokens.of_store(writer.group, writer.header) as tokens:
        todo = pending_blocks(cfg, writer)
        bar = progress_bar(cfg, tokens, todo)
        collector = DaskBlockRunner(
            cfg, client, writer, model_summary.hooks, model_summary.revision, store, lock, tokens
        )
        try:
            collector.run(deque(todo), bar)
        except BaseException:
            collector.stop()
            raise
        finally:
            bar.close()


def _check_workers_see_store(client: Client, store: str) -> str:
    """The lock file's text, after checking that every worker reads the same text: the store is on a
    filesystem they all see."""
    lock = lock_path(store).read_text()
    seen = client.run(_holds_lock, store, lock)
    blind = sorted(address for address, ok in seen.items() if not ok)
    if blind:
        raise SaepipeError(
            f"dask worker(s) {', '.join(blind)} cannot see the store {store} (nor its lock file): "
            f"put --out on a filesystem every worker mounts (for an s3:// --out, point SAEPIPE_CACHE "
            f"at one: the store is staged there)"
        )
    return lock


@dataclass
class BlockInFlight:
    """A block between its launch and its commit."""

    task: BlockTask
    forward: Future[Block] | None = None  # while the normalization is not fixed yet
    prepared: Future[PreparedBlock] | None = None  # until its rows are handed to write tasks
    summary_future: Future[BlockSummary] | None = None  # set with `prepared`
    summary: BlockSummary | None = None  # its result, once placed
    writes: list[Future[None]] = field(default_factory=list)  # the write tasks holding its rows
    open_chunks: int = 0  # chunks holding its rows that still wait for later blocks' rows

    def futures(self) -> list[Future]:
        return [f for f in (self.forward, self.prepared, self.summary_future, *self.writes) if f is not None]


@dataclass
class SharedChunk:
    """A chunk shared by consecutive blocks, collecting their pieces until it is full (or the split ends)."""

    first_row: int
    pieces: list[Future[Rows]] = field(default_factory=list)  # in row order
    blocks: list[BlockInFlight] = field(default_factory=list)


class DaskBlockRunner:
    def __init__(
        self,
        cfg: CollectConfig,
        client: Client,
        writer: StoreWriter,
        hooks: list[str],
        revision: str,
        store: str,
        lock: str,
        tokens: ContextTokens,
    ):
        self.cfg, self.client, self.writer, self.hooks, self.revision = cfg, client, writer, hooks, revision
        self.store, self.lock, self.tokens = store, lock, tokens
        self.norms = writer.normalizations()
        self.next_row = {split: writer.progress(split).block_rows for split in schema.SPLITS}
        self.chunk_rows = {split: writer.chunk_rows(split) for split in schema.SPLITS}
        self.open: dict[str, SharedChunk | None] = {split: None for split in schema.SPLITS}
        self.in_flight: deque[BlockInFlight] = deque()
        self.run_id = uuid.uuid4().hex[:8]

    def run(self, queue: deque[BlockTask], bar: tqdm) -> None:
        while queue or self.in_flight:
            window = _IN_FLIGHT_PER_THREAD * max(1, sum(self.client.nthreads().values()))
            while queue and len(self.in_flight) < max(2, window):  # 2: a shared chunk's next block runs
                self._launch(queue.popleft())
            if self.norms is None and self.in_flight:
                self._fix_normalization()
            moved = self._place_ready()
            while self.in_flight and self._committable(self.in_flight[0]):
                self._commit(self.in_flight.popleft(), bar)
                moved = True
            if not moved:
                from distributed import wait

                wait(self._awaited(), return_when="FIRST_COMPLETED")

    def stop(self) -> None:
        """After an error: cancel the blocks not placed yet, and wait for the writes already sent, so that
        none lands after this collect has let go of the store (and of its lock). Writes are sent only for
        blocks whose rows exist, so the wait is short."""
        from distributed import wait

        pending = [f for item in self.in_flight if item.summary is None for f in item.futures()]
        pending += [f for chunk in self.open.values() if chunk is not None for f in chunk.pieces]
        self.client.cancel(pending)
        writes = list({w.key: w for item in self.in_flight for w in item.writes}.values())
        try:
            wait(writes, timeout=_STOP_WAIT_S)
        except (TimeoutError, asyncio.TimeoutError):
            print(
                f"warning: {sum(not w.done() for w in writes)} write task(s) still running after {_STOP_WAIT_S} s: "
                f"wait for them to end before resuming this collect",
                file=sys.stderr,
            )

    def _submit(self, kind: str, task: BlockTask, fn: Callable, *args, priority: int = _HIGH) -> Future:
        return self.client.submit(
            fn, *args, key=f"saepipe-{kind}-{task.split}-{task.index}-{self.run_id}", priority=priority
        )

    def _launch(self, task: BlockTask) -> None:
        item = BlockInFlight(task)
        args = (self.cfg, self.hooks, self.revision, task, *self.tokens.read(task.contexts))
        if self.norms is None:  # only before the first block of a new store is done
            item.forward = self._submit("forward", task, _forward, *args, priority=0)
        else:
            self._prepared(item, self._submit("collect", task, _collect_block, *args, self.norms, priority=0))
        self.in_flight.append(item)

    def _prepared(self, item: BlockInFlight, future: Future[PreparedBlock]) -> None:
        item.prepared = future
        item.summary_future = self._submit("summary", item.task, _summary, future)

    def _fix_normalization(self) -> None:
        """From the first training block, as a single-process collect does: estimated on its worker,
        recorded here; the blocks launched meanwhile are normalized with the recorded values."""
        first = self.in_flight[0]
        assert first.forward is not None and (first.task.split, first.task.index) == ("train", 0), (
            "the normalization is fixed before the first block is committed"
        )
        norms = self._submit(
            "normalization", first.task, estimate_normalization, self.cfg, self.hooks, first.forward
        ).result()
        self.norms = fix_normalization(self.writer, norms)
        for item in self.in_flight:
            if item.forward is not None:
                self._prepared(
                    item, self._submit("prepare", item.task, _prepare, self.cfg, self.hooks, item.forward, self.norms)
                )
                item.forward = None

    def _place_ready(self) -> bool:
        """Give each block whose summary is in (in order) its first row, and hand its rows to write tasks."""
        moved = False
        for item in self.in_flight:
            if item.summary is not None:
                continue
            if not item.summary_future.done():
                break
            item.summary = item.summary_future.result()  # raises the worker's error, if any
            self._place(item)
            moved = True
        return moved

    def _place(self, item: BlockInFlight) -> None:
        split, n = item.task.split, item.summary.n_rows
        start, chunk = self.next_row[split], self.chunk_rows[split]
        self.next_row[split] = start + n
        for lo, hi, whole in chunk_parts(start, n, chunk):
            if whole:
                item.writes.append(
                    self._submit(
                        f"write-{lo}",
                        item.task,
                        _write_block_rows,
                        self.store,
                        self.lock,
                        split,
                        start + lo,
                        item.prepared,
                        lo,
                        hi,
                    )
                )
                continue
            if self.open[split] is None:
                self.open[split] = SharedChunk(start + lo)
            shared = self.open[split]
            shared.pieces.append(self._submit(f"piece-{lo}", item.task, _piece, item.prepared, lo, hi))
            shared.blocks.append(item)
            item.open_chunks += 1
            if (start + hi) % chunk == 0:
                self._close(split, item.task)
        if item.task.last_of_split and self.open[split] is not None:
            self._close(split, item.task)
        item.prepared = None  # its write tasks hold it on the worker until they are done

    def _close(self, split: str, task: BlockTask) -> None:
        shared, self.open[split] = self.open[split], None
        write = self._submit(
            f"write-shared-{shared.first_row}",
            task,
            _write_pieces,
            self.store,
            self.lock,
            split,
            shared.first_row,
            shared.pieces,
        )
        for item in shared.blocks:
            item.writes.append(write)
            item.open_chunks -= 1

    def _committable(self, item: BlockInFlight) -> bool:
        if item.summary is None or item.open_chunks or not all(w.done() for w in item.writes):
            return False
        for write in item.writes:
            write.result()  # raises a failed write's error
        return True

    def _commit(self, item: BlockInFlight, bar: tqdm) -> None:
        s = item.summary
        self.writer.commit_block(s.split, s.index, s.n_rows, s.stats, s.dropped)
        bar.update(s.positions)

    def _awaited(self) -> list[Future]:
        """What the loop can wait on: the next summary to place, and the writes of the next block to commit."""
        waiting = [item.summary_future for item in self.in_flight if item.summary is None][:1]
        waiting += [w for w in self.in_flight[0].writes if not w.done()]
        assert waiting, "the next block to commit waits on nothing in flight"
        return waiting


def chunk_parts(start: int, n: int, chunk: int) -> list[tuple[int, int, bool]]:
    """Rows [0, n) of a block written from row `start`, cut at chunk boundaries into (lo, hi, whole):
    whole=True for a run of whole chunks the block fills alone, False for its part of a chunk it
    shares with the blocks before or after it."""
    parts, pos, end = [], start, start + n
    while pos < end:
        if pos % chunk == 0 and end - pos >= chunk:
            hi = pos + (end - pos) // chunk * chunk
            parts.append((pos - start, hi - start, True))
        else:
            hi = min(end, (pos // chunk + 1) * chunk)
            parts.append((pos - start, hi - start, False))
        pos = hi
    return parts
