"""Shuffled training batches from one hook of a store.

Two ways to serve them, picked by size:
- resident: the whole split is read once (chunks decoded on a thread pool) into device memory as fp16,
  and each epoch draws a fresh permutation of all rows; batches are converted to the compute dtype on
  the device.
- streaming: each epoch visits the chunks in a seeded random order (a last, partial chunk always last,
  so every epoch serves the same number of batches), a window of whole chunks at a time, while a
  background thread reads the next window. The window's chunks are cut into runs of
  adjacent rows (batch_size / RUNS_PER_BATCH rows, so at least 16 runs per batch) and each run is read
  straight from its chunk file to a seeded random slot of the window's buffer (the mixing buffer), so a
  batch is a plain slice: one copy from the page cache, like a memmap read. Moving runs rather than
  single rows is sound because collect already shuffles rows across a block of 65,536 rows (512
  contexts): the rows of a run come from unrelated contexts. Moving single rows would cost a second copy
  (a gather per batch), which kept the reader far below memmap speed (docs/benchmarks.md). Runs that do
  not fill a last whole batch in a window are skipped that epoch.

From a remote store (a URL) whose chunks are plain bytes (what collect writes), the chunk objects are
fetched whole, `store.concurrency` requests at a time (ActivationStore.stream_chunks), running ahead in
the epochs' chunk order across window boundaries, and each run is copied from its fetched chunk to its
slot. The windows, slots and batches are the same as from a local copy of the store.

Memory: the window buffers (buffer_bytes_for), plus for a remote store up to 2·concurrency + 1 chunks
(remote_fetch_bytes_for).

Batch `i` depends only on (seed, i), never on what happened before, so a resumed run continues the
exact sequence of an uninterrupted one.

Data parallelism: with `world_size` N, `batch_size` is the global batch and rank r gets rows
[r·B/N, (r+1)·B/N) of each global batch; the N ranks together see exactly the batches one process
would. A streaming rank reads only the runs that reach its share.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from store_schema.limits import available_host_memory_bytes
from store_schema.reader import ActivationStore
from store_schema.schema import StoreError


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_memory_bytes()


MEMORY_FRACTION = 0.5  # the share of free memory a resident split may take


def fits_resident(nbytes: int, device: torch.device, memory_fraction: float) -> bool:
    """Whether rows of `nbytes` (fp16) may be held whole on `device`: at most `memory_fraction` of what is free."""
    return nbytes <= memory_fraction * available_memory_bytes(device)


WINDOW_CHUNKS = 8  # chunks the streaming loader reads and mixes together


@dataclass(frozen=True)
class _Window:
    epoch: int
    index: int
    chunks: tuple[int, ...]
    n_batches: int


class ShuffledBatches:
    def __init__(
        self,
        store: ActivationStore,
        hook: str,
        batch_size: int,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        split: str = "train",
        resident: bool | None = None,
        memory_fraction: float = MEMORY_FRACTION,
        window_chunks: int = WINDOW_CHUNKS,
        rank: int = 0,
        world_size: int = 1,
    ):
        store.require_hook(hook)
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"a batch of {batch_size} rows cannot be split evenly over {world_size} ranks")
        self.store, self.hook, self.split = store, hook, split
        self.batch_size, self.device, self.dtype, self.seed = batch_size, device, dtype, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.n_rows = store.n_rows(split)
        if self.n_rows < batch_size:
            raise StoreError(
                f"the store's {split} split has {self.n_rows:,} rows, fewer than one batch of "
                f"{batch_size:,}: lower --batch-size or collect more tokens"
            )
        self.width = store.width(hook)
        nbytes = self.n_rows * self.width * 2
        self.resident = fits_resident(nbytes, device, memory_fraction) if resident is None else resident
        self.window_chunks = window_chunks
        self._rows: torch.Tensor | None = None

    READ_AHEAD_WINDOWS = 2
    WINDOW_BUFFERS = READ_AHEAD_WINDOWS + 2  # the windows queued ahead, the one being read, the one served
    RUNS_PER_BATCH = 16  # streaming builds each batch from at least this many runs (see the module docstring)

    @classmethod
    def buffer_bytes_for(cls, chunk_rows: int, d_model: int, window_chunks: int = WINDOW_CHUNKS) -> int:
        """Rows the streaming loader holds at once, in bytes (fp16)."""
        return cls.WINDOW_BUFFERS * window_chunks * chunk_rows * d_model * 2

    @staticmethod
    def remote_fetch_bytes_for(chunk_rows: int, d_model: int, concurrency: int) -> int:
        """Chunk objects a remote streaming loader holds at most besides its buffers, in bytes: concurrency + 1
        fetched or arriving (stream_chunks), and as many again while the HTTP client joins the pieces of
        the responses arriving."""
        return (2 * concurrency + 1) * chunk_rows * d_model * 2

    @property
    def run_rows(self) -> int:
        """Adjacent rows the streaming loader moves together."""
        return max(1, min(self.store.chunk_rows, self.batch_size // self.RUNS_PER_BATCH))

    @property
    def batches_per_epoch(self) -> int:
        if self.resident:
            return self.n_rows // self.batch_size
        return sum(w.n_batches for w in self._windows(0))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches()

    def _share(self, batch_start: int) -> slice:
        """This rank's rows of the global batch that begins at `batch_start`."""
        first = batch_start + self.rank * self.local_batch_size
        return slice(first, first + self.local_batch_size)

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless batches [local_batch_size, d] (this rank's share of the global batch; all of it with one
        rank) in `dtype` on `device`, beginning with batch number `start`.
        A streamed batch already in `dtype` on the CPU is a view of the loader's buffer, which is
        recycled only once nothing else refers to it: keeping a batch is safe, and only costs a buffer."""
        return self._resident_batches(start) if self.resident else self._streamed_batches(start)

    # -- resident -----------------------------------------------------------------------------------
    def _resident_batches(self, start: int) -> Iterator[torch.Tensor]:
        if self._rows is None:
            rows = torch.from_numpy(self.store.read_rows(self.split, self.hook))
            self._rows = rows.to(self.device)
        per_epoch = self.n_rows // self.batch_size
        epoch, step = divmod(start, per_epoch)
        while True:
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
            perm = torch.randperm(self.n_rows, generator=gen).to(self.device)
            for j in range(step, per_epoch):
                idx = perm[self._share(j * self.batch_size)]
                yield self._rows.index_select(0, idx).to(self.dtype)
            epoch, step = epoch + 1, 0

    # -- streaming ----------------------------------------------------------------------------------
    def _runs_in(self, chunk: int) -> int:
        """Whole runs in a chunk's committed rows (the tail of a last, partial chunk may hold fewer)."""
        rows = self.store.chunk_rows
        return min(rows, self.n_rows - chunk * rows) // self.run_rows

    def _windows(self, epoch: int) -> list[_Window]:
        n_chunks = -(-self.n_rows // self.store.chunk_rows)
        # A last, partial chunk goes last, so every epoch's windows hold the same numbers of rows and serve
        # the same number of batches (batches_per_epoch): shuffled in among the others, it changed which
        # window lost a remainder, and an epoch could end a batch early or late.
        whole = n_chunks - (self.n_rows % self.store.chunk_rows != 0)
        order = np.random.default_rng([self.seed, epoch, 0xC4]).permutation(whole)
        order = np.concatenate([order, np.arange(whole, n_chunks)])
        windows = []
        for w, first in enumerate(range(0, n_chunks, self.window_chunks)):
            chunks = tuple(int(c) for c in order[first : first + self.window_chunks])
            rows = sum(self._runs_in(c) for c in chunks) * self.run_rows
            windows.append(_Window(epoch, w, chunks, rows // self.batch_size))
        return windows

    def _read_window(
        self, window: _Window, buffer: torch.Tensor, fetched: Iterator[tuple[int, np.ndarray]] | None = None
    ) -> torch.Tensor:
        """The window's batches, back to back: its chunks cut into runs, and each run read straight to a
        seeded random slot of `buffer` (the mixing buffer), so a batch is a plain slice. `fetched`: the
        chunks' rows as a remote store's chunk stream yields them (the window's chunks next, in order);
        without it the runs are read from the store here."""
        chunk, run = self.store.chunk_rows, self.run_rows
        starts = np.concatenate([c * chunk + np.arange(self._runs_in(c)) * run for c in window.chunks])
        slots = np.random.default_rng([self.seed, window.epoch, window.index]).permutation(len(starts))
        used_slots = -(-window.n_batches * self.batch_size // run)  # runs beyond the last whole batch: unread
        dest = buffer.numpy()
        pieces = [
            (int(first), dest[slot * run : (slot + 1) * run])
            for first, slot in zip(starts, slots)
            if slot < used_slots and self._reaches_share(slot)
        ]
        if fetched is None:
            self.store.read_into(self.split, self.hook, pieces, threads=2)  # local disks: 2 threads keep up
        else:
            by_chunk: dict[int, list[tuple[int, np.ndarray]]] = {}
            for first, dest in pieces:
                by_chunk.setdefault(first // chunk, []).append((first, dest))
            for expected in window.chunks:
                got, rows = next(fetched)
                assert got == expected, f"chunk stream out of step: {got} for {expected}"
                for first, dest in by_chunk.get(got, []):
                    dest[:] = rows[first - got * chunk : first - got * chunk + len(dest)]
        return buffer[: window.n_batches * self.batch_size]

    def _reaches_share(self, slot: int) -> bool:
        """Whether the run read into `slot` of a window holds any of this rank's rows."""
        if self.world_size == 1:
            return True
        run, local = self.run_rows, self.local_batch_size
        first = slot * run // local  # the run covers parts first .. first + parts - 1 (a part: B/N rows)
        parts = ((slot + 1) * run - 1) // local - first + 1
        return parts >= self.world_size or (self.rank - first) % self.world_size < parts

    def _streamed_batches(self, start: int) -> Iterator[torch.Tensor]:
        if self.batches_per_epoch == 0:
            raise StoreError(
                f"a streaming window ({self.window_chunks} chunks of {self.store.chunk_rows:,} rows) holds "
                f"less than one batch of {self.batch_size:,}: lower --batch-size"
            )

        def plan() -> Iterator[tuple[_Window, int]]:
            """(window, first batch within it) from batch `start` on, skipping whole windows unread."""
            epoch, skip = 0, start
            while True:
                for window in self._windows(epoch):
                    if skip >= window.n_batches:
                        skip -= window.n_batches
                        continue
                    yield window, skip
                    skip = 0
                epoch += 1

        ready: queue.Queue = queue.Queue(maxsize=self.READ_AHEAD_WINDOWS)
        # Window buffers are recycled, never reallocated: a fresh buffer of this size is fresh pages that the
        # kernel must fault in and zero on every window, a large share of a read's time. Pinned on CUDA, so
        # the copies to the device are asynchronous.
        free: queue.Queue = queue.Queue()
        for _ in range(self.WINDOW_BUFFERS):
            free.put(self._window_buffer())
        stop = threading.Event()

        def read_ahead() -> None:
            # A remote store's chunk objects are fetched `concurrency` at a time, running ahead across
            # windows in the plan's order (requests take tens of ms each: a window's worth would leave
            # the connections idle between windows). Local files are read window by window.
            fetched = (
                self.store.stream_chunks(self.split, self.hook, (c for window, _ in plan() for c in window.chunks))
                if self.store.streams_chunk_objects(self.split, self.hook)
                else None
            )
            try:
                for window, first in plan():
                    buffer = _get_unless_stopped(free, stop)
                    if buffer is None:
                        return
                    rows = self._read_window(window, buffer, fetched)
                    _put_unless_stopped(ready, (window, first, rows, buffer), stop)
            except BaseException as e:  # surface read errors in the consuming thread
                _put_unless_stopped(ready, e, stop)
            finally:
                if fetched is not None:
                    fetched.close()

        reader = threading.Thread(target=read_ahead, daemon=True, name="saepipe-read-ahead")
        reader.start()
        served: list[torch.Tensor] = []  # buffers of windows fully served, recycled once the consumer moved on
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                window, first, rows, buffer = item
                del item
                rows = rows.to(self.device, non_blocking=True)
                for j in range(first, window.n_batches):
                    yield self._batch(rows[self._share(j * self.batch_size)])
                    # The consumer asked for the next batch, so it has let go of the previous window's last one.
                    while served:
                        free.put(self._recycled(served.pop()))
                del rows
                served.append(buffer)
        finally:
            # Wait for the reader (it polls `stop` while waiting, and a read is bounded): a thread still
            # inside torch or numpy when the interpreter exits can abort the process.
            stop.set()
            reader.join(timeout=60)

    def _window_buffer(self) -> torch.Tensor:
        buffer = torch.empty(self.window_chunks * self.store.chunk_rows, self.width, dtype=torch.float16)
        return buffer.pin_memory() if self.device.type == "cuda" else buffer

    def _batch(self, rows: torch.Tensor) -> torch.Tensor:
        batch = rows.to(self.dtype)
        if batch.device.type == "cpu" and batch.data_ptr() == rows.data_ptr() and not _CAN_COUNT_USES:
            batch = batch.clone()  # a view of a recycled buffer, and no way to tell when it is free again
        return batch

    def _recycled(self, buffer: torch.Tensor) -> torch.Tensor:
        """`buffer` itself when nothing but the loader refers to it any more; else (the consumer kept a
        batch, a view of it) a new buffer, leaving the old one to the consumer."""
        if self.device.type == "cuda":  # the asynchronous copy out of `buffer` must be done
            torch.cuda.current_stream(self.device).synchronize()
        if _CAN_COUNT_USES and _memory_holders(buffer) > 1:
            return self._window_buffer()
        return buffer


_CAN_COUNT_USES = hasattr(torch._C, "_storage_Use_Count")


def _memory_holders(tensor: torch.Tensor) -> int:
    """How many tensors hold this tensor's memory: itself, plus one per live view of it."""
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) - 1


def _get_unless_stopped(free: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return free.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def _put_unless_stopped(ready: queue.Queue, item, stop: threading.Event) -> None:
    """Queue `item`, giving up once the consumer has gone (a closed iterator must not leave the reader
    thread blocked forever on a full queue, holding its windows)."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _mix(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class RowAlignedBatches:
    """Shuffled batches of several hooks together: each batch is a tuple (hook 1's rows, hook 2's rows,
    ...) whose row i is one token in every part (what a transcoder trains on). Each hook has its own
    ShuffledBatches with the same seed, batch size and residency; their shuffles depend on neither the
    hook nor its width, so their batches hold the same rows in the same order. The parts are not
    concatenated: that copy of every byte halved the read speed (docs/benchmarks.md)."""

    def __init__(self, store: ActivationStore, hooks: tuple[str, ...], batch_size: int, **kwargs):
        resident = kwargs.pop("resident", None)
        device = kwargs["device"]
        if resident is None:  # one choice for all hooks: their rows held together, or all streamed
            nbytes = store.n_rows(kwargs.get("split", "train")) * sum(store.width(h) for h in hooks) * 2
            resident = fits_resident(nbytes, device, kwargs.get("memory_fraction", MEMORY_FRACTION))
        self.loaders = [ShuffledBatches(store, hook, batch_size, resident=resident, **kwargs) for hook in hooks]
        self.resident = resident

    @property
    def batches_per_epoch(self) -> int:
        return self.loaders[0].batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        streams = [loader.batches(start) for loader in self.loaders]
        try:
            yield from zip(*streams)
        finally:
            for stream in streams:
                stream.close()


def batches_of(store: ActivationStore, hooks: tuple[str, ...], batch_size: int, **kwargs):
    """The loader of one hook's batches, or of several hooks' side by side (RowAlignedBatches)."""
    if len(hooks) == 1:
        return ShuffledBatches(store, hooks[0], batch_size, **kwargs)
    return RowAlignedBatches(store, hooks, batch_size, **kwargs)
