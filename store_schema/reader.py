"""Opening and validating a store, and reading committed rows from it."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Protocol

import google_crc32c
import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from store_schema import schema, shards
from store_schema.chunk_files import is_checksummed, raw_layout
from store_schema.header import StoreHeader
from store_schema.limits import check_fits_in_memory, check_root_metadata_size
from store_schema.lock import live_holder
from store_schema.normalization import Normalization

REMOTE_CONCURRENCY = 16  # chunk requests in flight to a remote store: object stores answer in tens of ms
CONCURRENCY_VARIABLE = "SAEPIPE_REMOTE_CONCURRENCY"
Piece = tuple[int, np.ndarray]  # (first row, destination): rows [first, first + len(destination)) of one chunk


class ActivationStore:
    """A read-only view of a store that shows committed rows only."""

    def __init__(self, group: zarr.Group, location: str, header: StoreHeader, concurrency: int = REMOTE_CONCURRENCY):
        self.group = group
        self.location = location
        # chunk objects fetched at once from a remote store (a local one is read with the callers' threads)
        self.concurrency = concurrency
        self.header = header  # checked by `open`, with the arrays it names
        self._arrays: dict[str, zarr.Array] = {}
        self._sources: dict[str, ChunkSource] = {}  # each array's chunk source (_source)

    @classmethod
    def open(cls, path: str | os.PathLike, concurrency: int | None = None) -> ActivationStore:
        """A store at a local path, or at a URL fsspec knows: file://, s3://, gs://, http(s):// (read-only).
        Object-store credentials and endpoints come from the usual environment (e.g. AWS_* variables).
        `concurrency`: chunk requests in flight to a remote store (default: $SAEPIPE_REMOTE_CONCURRENCY,
        else REMOTE_CONCURRENCY)."""
        location = local_path(str(path))
        if "://" not in location and not Path(location).exists():
            holder = live_holder(location)
            if holder is not None:  # a collect that is still packing its text has not created the store yet
                raise schema.StoreError(
                    f"no store at {location} yet: a collect (pid {holder['pid']} on {holder['host']}, since "
                    f"{holder['started']}) is creating it; wait for it to finish"
                )
            raise schema.StoreError(f"no store at {location}: run `saepipe collect --out {location}` first")
        concurrency = remote_concurrency() if concurrency is None else concurrency
        check_root_metadata_size(location)
        try:
            group = zarr.open_group(store=location, mode="r", storage_options=storage_options(location, concurrency))
        except ImportError as e:  # fsspec names the backend a URL needs (s3fs, gcsfs, aiohttp)
            raise schema.StoreError(
                f"opening {location} needs a package that is not installed ({e}): pip install 'saepipe[remote]'"
            ) from None
        except Exception as e:  # zarr raises several kinds for "not a group"
            if "://" not in location and (Path(location) / "zarr.json").is_file():
                raise schema.damaged(
                    f"its root metadata {Path(location) / 'zarr.json'} cannot be read ({type(e).__name__}: {e})"
                ) from None
            raise schema.StoreError(
                f"{location} is not a Zarr group ({type(e).__name__}: {e}); "
                f"pass the folder that `saepipe collect --out` wrote"
            ) from e
        attrs = group.attrs.get(schema.ATTRS_KEY)
        if not isinstance(attrs, dict):
            raise schema.StoreError(f"{location} is a Zarr group but not a saepipe activation store")
        try:
            header = StoreHeader.from_attrs(attrs)
            _check_arrays_match(group, header)
            _check_normalizations(group, header)
            check_fits_in_memory(group, header)
        except schema.StoreError as e:
            raise schema.StoreError(f"{location}: {e}") from None
        return cls(group, location, header, concurrency)

    # -- description --------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.header.hooks)

    @property
    def d_model(self) -> int:
        """The model's residual width: the width of every hook's rows but those `width` says otherwise of."""
        return self.header.d_model

    def width(self, hook: str) -> int:
        """The width of one hook's rows (d_model, or e.g. an MLP's hidden width)."""
        self.require_hook(hook)
        return self.header.width(hook)

    @property
    def context_size(self) -> int:
        return self.header.context_size

    @property
    def complete(self) -> bool:
        return self.header.complete

    @property
    def fingerprint(self) -> str:
        """Identity of the store's contents: its configuration plus the rows committed so far."""
        rows = {s: self.n_rows(s) for s in schema.SPLITS}
        return schema.fingerprint({"config": self.header.config_fingerprint, "rows": rows})

    def n_rows(self, split: str) -> int:
        return self.header.rows_committed(split)

    def require_complete(self) -> None:
        if not self.complete:
            done = self.n_rows("train")
            planned = self.header.planned_rows["train"]
            raise schema.StoreError(
                f"store {self.location} is incomplete ({done:,} of {planned:,} training rows "
                f"committed): finish it by re-running the same `saepipe collect` command"
            )

    def require_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise schema.StoreError(f"hook '{hook}' is not in store {self.location}; it holds: {', '.join(self.hooks)}")

    def normalization(self, hook: str) -> Normalization:
        norm = self.header.normalization(hook, self.group)
        if norm is None:
            raise schema.StoreError(f"store {self.location} has no normalization recorded for '{hook}' yet")
        return norm

    def running_stats(self, split: str, hook: str) -> schema.RunningStats | None:
        return self.header.running_stats(split, hook, self.group)

    def skipped_contexts(self) -> np.ndarray:
        """Contexts left out for non-finite activations (their indices into `tokens`)."""
        if not self.header.small_metadata:
            return np.asarray(self.header.skipped_contexts_v1, dtype=np.int64)
        return self.group[schema.SKIPPED_CONTEXTS][: self.header.skipped_count]

    # -- arrays -------------------------------------------------------------------------------------
    @cached_property
    def tokens(self) -> zarr.Array:
        return self.group[schema.TOKENS]

    @cached_property
    def context_split(self) -> np.ndarray:
        # The store's contexts as the attributes count them: an append grows `tokens` and `context_split`
        # before its rows are committed, and its contexts are not the store's until then.
        n = self.header.split.n_contexts or None
        return self.group[schema.CONTEXT_SPLIT][:n]

    def contexts(self, split: str) -> np.ndarray:
        """Indices into `tokens` of the split's contexts that have rows (skipped ones left out)."""
        idx = np.flatnonzero(self.context_split == schema.SPLIT_CODES[split])
        skipped = self.skipped_contexts()
        return np.setdiff1d(idx, skipped.astype(idx.dtype)) if len(skipped) else idx

    def acts(self, split: str, hook: str) -> zarr.Array:
        """The raw Zarr array; rows at and beyond n_rows(split) are not committed and must not be read."""
        self.require_hook(hook)
        path = schema.acts_path(split, hook)
        if path not in self._arrays:  # opened once: every lookup of a remote array is a request
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    @property
    def chunk_rows(self) -> int:
        return self.header.chunk_rows

    def read_rows(self, split: str, hook: str, start: int = 0, stop: int | None = None, threads: int = 4) -> np.ndarray:
        """Committed fp16 rows [start, stop) of one hook, read a chunk per task on a thread pool."""
        n = self.n_rows(split)
        stop = n if stop is None else min(stop, n)
        start = max(0, min(start, stop))
        step = self.chunk_rows
        # Align reads to chunk boundaries so no chunk is decoded twice.
        bounds = list(range(start - start % step + step, stop, step))
        ranges = [r for r in zip([start] + bounds, bounds + [stop]) if r[0] < r[1]]
        return self._read_ranges(split, hook, ranges, threads)

    def read_chunks(
        self, split: str, hook: str, chunks: list[int], threads: int = 4, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The committed rows of the given chunks (any order), concatenated in that order, read in
        parallel; into `out` (exactly that many fp16 rows) when given."""
        n, step = self.n_rows(split), self.chunk_rows
        ranges = [(c * step, min((c + 1) * step, n)) for c in chunks if c * step < n]
        return self._read_ranges(split, hook, ranges, threads, out)

    def _read_ranges(
        self, split: str, hook: str, ranges: list[tuple[int, int]], threads: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows of each [a, b) range (each within one chunk), concatenated."""
        shape = (sum(b - a for a, b in ranges), self.width(hook))
        if out is None:
            out = np.empty(shape, np.float16)
        elif out.shape != shape or out.dtype != np.float16 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float16 array of shape {shape}, got {out.dtype} {out.shape}")
        offsets = np.cumsum([0] + [b - a for a, b in ranges])
        self.read_into(split, hook, [(a, out[offsets[i] : offsets[i + 1]]) for i, (a, b) in enumerate(ranges)], threads)
        return out

    def read_into(self, split: str, hook: str, pieces: list[Piece], threads: int = 2) -> None:
        """Fill each piece's destination (a contiguous fp16 [n, width(hook)] array) with the committed rows
        [first, first + n); a piece lies within one chunk. The array's chunk source (_source) reads them:
        a local array's chunk files straight into the destinations, a chunk per task on `threads`
        threads; an object store's chunk objects whole, `concurrency` at a time, the rows copied out."""
        by_chunk = self._pieces_by_chunk(split, hook, pieces)
        if by_chunk:
            self._source(split, hook).fill(by_chunk, threads)

    def _pieces_by_chunk(self, split: str, hook: str, pieces: list[Piece]) -> dict[int, list[Piece]]:
        """The non-empty pieces grouped by chunk, each checked to be committed rows within its chunk."""
        n_rows = self.n_rows(split)
        by_chunk: dict[int, list[Piece]] = {}
        for first, dest in pieces:
            if not len(dest):
                continue
            chunk = first // self.chunk_rows
            if (
                first < 0
                or first + len(dest) > min(n_rows, (chunk + 1) * self.chunk_rows)
                or not dest.flags.c_contiguous
            ):
                raise ValueError(
                    f"rows [{first}, {first + len(dest)}) are not committed rows within one chunk "
                    f"of {split}/{hook}, or their destination is not contiguous"
                )
            by_chunk.setdefault(chunk, []).append((first, dest))
        return by_chunk

    def _source(self, split: str, hook: str) -> ChunkSource:
        """Where the array's chunks are read from, chosen here once per array: its local chunk files, or
        its chunk objects in an object store (any store that is not a local folder)."""
        path = schema.acts_path(split, hook)
        source = self._sources.get(path)
        if source is None:
            arr, n_rows, name = self.acts(split, hook), self.n_rows(split), self._chunk_name(split, hook)
            if isinstance(arr.store, LocalStore):
                source = _ChunkFiles(arr, n_rows, name)
            else:
                source = _ChunkObjects(arr, n_rows, name, self.concurrency)
            source = self._sources.setdefault(path, source)  # two threads asking at once get the same one
        return source

    def _chunk_name(self, split: str, hook: str) -> str:
        return f"chunk {{}} of {schema.acts_path(split, hook)} in {self.location}"

    def streams_chunk_objects(self, split: str, hook: str) -> bool:
        """Whether the split's chunks are objects in an object store, fetched whole ahead of their use
        (stream_chunks) rather than read in place."""
        return self._source(split, hook).fetches_ahead

    def stream_chunks(self, split: str, hook: str, chunks: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(chunk, its committed fp16 rows, read-only) for each chunk in `chunks`, in that order. From an
        object store (streams_chunk_objects), `concurrency` requests are kept in flight, running ahead of
        the caller; at most `concurrency` chunks are held besides the one last yielded, which bounds the
        memory. Closing the iterator stops the fetching. A local store's chunks are read when asked for."""
        return self._source(split, hook).stream(chunks)

    def read_mapping(self, split: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(context index, position) of committed rows [start, stop)."""
        stop = self.n_rows(split) if stop is None else min(stop, self.n_rows(split))
        return (
            self.group[schema.row_context_path(split)][start:stop],
            self.group[schema.row_position_path(split)][start:stop],
        )

    def read_row_stats(self, split: str, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        if self.header.normalization_mode != "token":
            return None
        stop = self.n_rows(split) if stop is None else min(stop, self.n_rows(split))
        return self.group[schema.row_stats_path(split, hook)][start:stop]


class ChunkSource(Protocol):
    """Where one array of rows has its chunks: local chunk files (_ChunkFiles) or chunk objects in an
    object store (_ChunkObjects). Either reads a chunk of the raw layout (raw_layout) itself, from its own
    file or from its shard's where the shard's index puts it, and checks its CRC32C; any other chunk
    (compressed, or an older store's unwritten fill-value chunk) through Zarr."""

    fetches_ahead: bool  # chunks are fetched whole, ahead of their use (stream), rather than read in place

    def fill(self, by_chunk: dict[int, list[Piece]], threads: int) -> None:
        """Fill every piece, grouped by chunk (each within its chunk's committed rows)."""
        ...

    def stream(self, chunks: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(chunk, its committed rows, read-only) for each of `chunks`, in that order."""
        ...


class _Chunks:
    """What both sources know of one array's chunks, and of the shards that hold them when it is sharded."""

    def __init__(self, arr: zarr.Array, n_rows: int, name: str):
        self.arr, self.n_rows, self._name = arr, n_rows, name
        self.chunk_rows, self.width = arr.chunks[0], arr.shape[1]
        self.checksummed = is_checksummed(arr)
        self.sharded, self.shard_chunks = arr.shards is not None, shards.shard_chunks(arr)
        self.index_bytes = shards.index_bytes(self.shard_chunks)
        # a chunk as stored (raw layout): its rows, then their CRC32C when checksummed
        self.stored_bytes = self.chunk_rows * self.width * arr.dtype.itemsize + 4 * self.checksummed
        # The indexes of whole committed shards: each would otherwise be read again for every chunk of the
        # shard (a request each, from an object store). A shard still being filled is replaced as it fills.
        self._indexes: dict[int, np.ndarray] = {}

    def name(self, chunk: int) -> str:
        return self._name.format(chunk)

    def key(self, chunk: int) -> str:
        """The key within the store of the file that holds the chunk: its own, or its shard's."""
        return _file_key(self.arr, (chunk, 0))

    def offset(self, chunk: int, read_index) -> int | None:
        """Where the chunk starts in its shard, as the shard's index says (`read_index()`: the shard's last
        `index_bytes`, asked for only when the index is not cached); None when the shard does not hold the
        chunk in an array without checksums (Zarr reads it as the fill value). A damaged index, or one
        that does not hold a chunk of a checksummed array (collect writes every chunk), raises."""
        shard = chunk // self.shard_chunks
        index = self._indexes.get(shard)
        if index is None:
            index = shards.decode_index(read_index(), self.shard_chunks)
            if index is None:
                raise schema.damaged(
                    f"{self.name(chunk)} cannot be found: its shard's index fails its checksum (or is truncated)"
                )
            if (shard + 1) * self.shard_chunks * self.chunk_rows <= self.n_rows:
                self._indexes[shard] = index
        start, nbytes = index[chunk % self.shard_chunks]
        if start == shards.ABSENT:
            if self.checksummed:
                raise _missing(self.name(chunk))
            return None
        if nbytes != self.stored_bytes:
            raise schema.damaged(
                f"{self.name(chunk)} is {int(nbytes):,} bytes by its shard's index, not {self.stored_bytes:,}"
            )
        return int(start)

    def committed(self, chunk: int) -> int:
        """How many of the chunk's rows are committed."""
        return max(0, min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows))

    def through_zarr(self, chunk: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the chunk, decoded by Zarr (a missing chunk reads as the fill value)."""
        return _checked(lambda: self.arr[start:stop], self.name(chunk))


class _ChunkFiles(_Chunks):
    """A local array's chunk files. With the raw layout each is read straight into the destinations, one
    `preadv` per stretch of adjacent pieces, so scattering rows costs no more than reading them; its
    CRC32C is checked the first time the whole chunk is read. A chunk of a sharded array is read so too,
    from its place in its shard's file. A chunk per task, on the `threads` threads each call asks for
    (local disks need no more)."""

    fetches_ahead = False

    def __init__(self, arr: zarr.Array, n_rows: int, name: str):
        super().__init__(arr, n_rows, name)
        self.root = Path(arr.store.root)
        self.raw = _raw_chunk_files(arr) is not None
        # Whole committed chunks whose CRC32C this process has checked: a training run reads each chunk
        # every epoch, and checking it again would halve the read speed (docs/benchmarks.md: CRC32C rate).
        self._verified: set[int] = set()

    def fill(self, by_chunk: dict[int, list[Piece]], threads: int) -> None:
        if len(by_chunk) == 1 or threads <= 1:
            for chunk, pieces in by_chunk.items():
                self._read(chunk, pieces)
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(self._read, by_chunk, by_chunk.values()))

    def stream(self, chunks: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        for chunk in chunks:
            rows = np.empty((self.committed(chunk), self.width), self.arr.dtype)
            self.fill({chunk: [(chunk * self.chunk_rows, rows)]}, threads=1)
            rows.flags.writeable = False
            yield chunk, rows

    def _read(self, chunk: int, pieces: list[Piece]) -> None:
        """The pieces of one chunk, from its file when it has the raw layout, else through Zarr."""
        pieces = sorted(pieces, key=lambda piece: piece[0])
        path = self.root / self.key(chunk)
        on_disk = path.exists()
        if self.checksummed and not on_disk:  # collect writes every chunk: Zarr would read it as zeros
            raise _missing(self.name(chunk))
        if self.raw and on_disk:
            self._read_file(chunk, path, pieces)
            return
        start, stop = pieces[0][0], max(first + len(dest) for first, dest in pieces)
        _scatter(self.through_zarr(chunk, start, stop), start, pieces)

    def _read_file(self, chunk: int, path: Path, pieces: list[Piece]) -> None:
        """The pieces (sorted) straight from the chunk's file: its own, or its shard's from where the shard's
        index puts it (index and rows read through one open file: a shard replaced meanwhile is not mixed)."""
        row_bytes, base = self.width * self.arr.dtype.itemsize, chunk * self.chunk_rows
        with open(path, "rb") as f:
            at = self.offset(chunk, lambda: _read_tail(f, self.index_bytes)) if self.sharded else 0
            if at is None:
                for _, dest in pieces:
                    dest[...] = self.arr.fill_value
                return
            if self.checksummed and chunk not in self._verified:
                # the whole chunk is read, gaps into scratch, so that its CRC32C can be checked
                if not _read_verified(f, pieces, base, self.chunk_rows, row_bytes, at):
                    raise schema.damaged(f"{self.name(chunk)} fails its checksum (or is truncated)")
                if (chunk + 1) * self.chunk_rows <= self.n_rows:  # a chunk still being filled changes
                    self._verified.add(chunk)
                return
            for start, stretch in _adjacent_stretches(pieces):
                views = [memoryview(dest).cast("B") for dest in stretch]
                if not _read_exactly(f, views, at + (start - base) * row_bytes):
                    raise schema.damaged(f"{self.name(chunk)} is truncated")


class _ChunkObjects(_Chunks):
    """An object store's chunk objects (S3, GCS, HTTP: Zarr's FsspecStore): each fetched whole in one
    request (a chunk of a sharded array: its byte range of its shard, once the shard's index is known),
    `concurrency` requests in flight on as many threads, through the synchronous twin of the store's
    fsspec filesystem (its requests run on fsspec's event loop); with the raw layout, its CRC32C checked
    and its rows a read-only view of the response."""

    fetches_ahead = True

    def __init__(self, arr: zarr.Array, n_rows: int, name: str, concurrency: int):
        super().__init__(arr, n_rows, name)
        self.raw = raw_layout(arr)
        self.fs = _synchronous(arr.store.fs)
        self.absent = arr.store.allowed_exceptions  # what the filesystem raises for a missing object
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="saepipe-fetch")

    def fill(self, by_chunk: dict[int, list[Piece]], threads: int) -> None:
        for chunk, rows in self.stream(sorted(by_chunk)):
            _scatter(rows, chunk * self.chunk_rows, by_chunk[chunk])

    def stream(self, chunks: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        pending: collections.deque[tuple[int, Future]] = collections.deque()
        todo = iter(chunks)

        def fill() -> None:
            while len(pending) < self.concurrency and (chunk := next(todo, None)) is not None:
                pending.append((chunk, self._pool.submit(self._fetch, chunk)))

        try:
            fill()
            while pending:
                chunk, future = pending.popleft()
                rows = future.result()
                fill()  # keep `concurrency` requests in flight while the caller uses this chunk
                yield chunk, rows
        finally:
            for _, future in pending:
                future.cancel()

    def _fetch(self, chunk: int) -> np.ndarray:
        """The chunk's committed rows [n, d], read-only. A missing or damaged checksummed chunk raises a
        StoreError naming it."""
        rows = self._fetch_raw(chunk) if self.raw else self._fetch_through_zarr(chunk)
        rows.flags.writeable = False
        return rows

    def _fetch_raw(self, chunk: int) -> np.ndarray:
        """The rows, a view of the response; the fill value when the object is missing from an array
        without checksums (an older store's unwritten chunk, which Zarr reads so too), or its shard does
        not hold it."""
        try:
            data = self._stored(chunk)
        except self.absent:
            if self.checksummed:
                raise _missing(self.name(chunk)) from None
            data = None
        if data is None:
            return np.full((self.committed(chunk), self.width), self.arr.fill_value, self.arr.dtype)
        size = self.chunk_rows * self.width * self.arr.dtype.itemsize
        if len(data) != size + 4 * self.checksummed or (
            self.checksummed and google_crc32c.value(data[:size]) != int.from_bytes(data[size:].tobytes(), "little")
        ):
            what = "fails its checksum (or is truncated)" if self.checksummed else "is truncated"
            raise schema.damaged(f"{self.name(chunk)} {what}")
        return data[:size].view(self.arr.dtype).reshape(self.chunk_rows, self.width)[: self.committed(chunk)]

    def _stored(self, chunk: int) -> np.ndarray | None:
        """The chunk's bytes as stored: its whole object, or its range of its shard (two requests: the
        shard's index, unless cached, then the range); None when a shard of an array without checksums
        does not hold it."""
        path = self._object(chunk)
        if not self.sharded:
            return np.frombuffer(self.fs.cat_file(path), np.uint8)
        at = self.offset(chunk, lambda: _cat_range(self.fs, path, -self.index_bytes))
        return None if at is None else np.frombuffer(_cat_range(self.fs, path, at, at + self.stored_bytes), np.uint8)

    def _fetch_through_zarr(self, chunk: int) -> np.ndarray:
        """The rows of a chunk Zarr must decode (compressed, filtered)."""
        if self.checksummed and not self.fs.exists(self._object(chunk)):
            raise _missing(self.name(chunk))
        start = chunk * self.chunk_rows
        return self.through_zarr(chunk, start, start + self.committed(chunk))

    def _object(self, chunk: int) -> str:
        """The path in the filesystem of the object that holds the chunk: its own, or its shard's."""
        return _object_path(self.arr.store, self.key(chunk))


def _raw_chunk_files(arr: zarr.Array) -> Path | None:
    """The folder of a local array's chunk files when they have the raw layout (raw_layout), read
    straight into the destinations; None for any other array."""
    if not isinstance(arr.store, LocalStore) or not raw_layout(arr):
        return None
    return Path(arr.store.root) / arr.path


def _file_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The key within the array's store of the file (object) that holds the chunk at `coords`: the chunk's
    own, or, when the array is sharded, its shard's (Zarr's chunk grid is then the grid of shards)."""
    if arr.shards is not None:
        coords = tuple(c // (s // n) for c, s, n in zip(coords, arr.shards, arr.chunks))
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


def _read_tail(f, n: int) -> bytes:
    """The last `n` bytes of an open file (all of it when it is shorter)."""
    f.seek(max(0, os.fstat(f.fileno()).st_size - n))
    return f.read(n)


def _cat_range(fs, path: str, start: int, stop: int | None = None) -> bytes:
    """Bytes [start, stop) of an object (`start` < 0 and no `stop`: its last -start bytes), in one ranged
    request. A server that ignores ranges sends the whole object (Python's http.server does): the range
    is then cut from it. Fewer bytes than asked: the object is shorter."""
    data = fs.cat_file(path, start=start, end=stop)
    asked = -start if stop is None else stop - start
    return data[start:stop] if len(data) > asked else data


def _object_path(store: FsspecStore, key: str) -> str:
    """The path in the store's filesystem of the object at `key` (as the store itself finds it)."""
    root = store.path.rstrip("/")
    return f"{root}/{key}" if root else key


def _synchronous(fs):
    """The synchronous twin of a Zarr store's asynchronous fsspec filesystem: the same class and options,
    but callable from any thread (its requests run on fsspec's own event loop; Zarr's loop is private to
    Zarr). fsspec keeps one instance per class and options, so the twin is made once."""
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    if isinstance(fs, AsyncFileSystemWrapper):  # a synchronous filesystem that Zarr wrapped
        return fs.sync_fs
    return type(fs)(*fs.storage_args, **{**fs.storage_options, "asynchronous": False})


def _scatter(rows: np.ndarray, first_row: int, pieces: list[tuple[int, np.ndarray]]) -> None:
    """Copy each piece's rows out of `rows`, which holds rows from first_row on."""
    for first, dest in pieces:
        dest[:] = rows[first - first_row : first - first_row + len(dest)]


def _missing(name: str) -> schema.StoreError:
    return schema.damaged(f"{name} is missing")


def remote_concurrency() -> int:
    """Chunk requests in flight to a remote store: $SAEPIPE_REMOTE_CONCURRENCY, else REMOTE_CONCURRENCY."""
    value = os.environ.get(CONCURRENCY_VARIABLE, "").strip()
    if not value:
        return REMOTE_CONCURRENCY
    if not value.isdigit() or int(value) < 1:
        raise schema.StoreError(
            f"{CONCURRENCY_VARIABLE}={value} is not a positive whole number: set it to e.g. 16, or unset it"
        )
    return int(value)


def storage_options(location: str, concurrency: int) -> dict | None:
    """fsspec options for a URL; None for a local path, which takes none. For S3 (unless fsspec's own
    configuration says otherwise): a connection for each request in flight (botocore keeps 10, which would
    cap the concurrency); one GET per chunk (s3fs otherwise asks for an object's size first, to split a
    large one into ranges: a second round trip for every chunk; chunks are fetched in parallel already);
    and no second checksum of every response (each chunk's CRC32C is checked when it is read)."""
    if not location.startswith(("s3://", "s3a://")):
        return None
    import fsspec.config

    configured = fsspec.config.conf.get("s3", {})
    client = {"max_pool_connections": max(10, concurrency), "response_checksum_validation": "when_required"}
    options = {"config_kwargs": {**client, **configured.get("config_kwargs", {})}}
    if "max_concurrency" not in configured:
        options["max_concurrency"] = 1
    return options


def chunk_exists(arr: zarr.Array, coords: tuple[int, ...]) -> bool:
    """Whether the chunk at `coords` has been written, in a local folder or an object store: its file, and
    when the array is sharded, its entry in its shard's index. A shard whose index fails its checksum is
    taken to hold it: decoding the chunk names that damage."""
    key = _file_key(arr, coords)
    if arr.shards is None:
        if isinstance(arr.store, LocalStore):
            return (Path(arr.store.root) / key).exists()
        return _synchronous(arr.store.fs).exists(_object_path(arr.store, key))
    per_shard = shards.shard_chunks(arr)  # row arrays are sharded along their rows only
    size = shards.index_bytes(per_shard)
    try:
        if isinstance(arr.store, LocalStore):
            with open(Path(arr.store.root) / key, "rb") as f:
                tail = _read_tail(f, size)
        else:
            tail = _cat_range(_synchronous(arr.store.fs), _object_path(arr.store, key), -size)
    except (FileNotFoundError, *getattr(arr.store, "allowed_exceptions", ())):
        return False
    index = shards.decode_index(tail, per_shard)
    return index is None or index[coords[0] % per_shard][0] != shards.ABSENT


def is_checksum_error(e: ValueError) -> bool:
    """Whether Zarr's crc32c codec raised `e` (it raises a plain ValueError on a mismatch)."""
    return "checksum" in str(e)


def _checked(read, what: str):
    """`read()`, turning the checksum error of Zarr's crc32c codec into one that names the chunk."""
    try:
        return read()
    except ValueError as e:
        if not is_checksum_error(e):
            raise
        raise schema.damaged(f"{what} fails its checksum") from None


def _read_verified(
    f, pieces: list[tuple[int, np.ndarray]], base: int, chunk_rows: int, row_bytes: int, offset: int = 0
) -> bool:
    """Read a whole checksummed chunk, stored at `offset` in the file (0: a file of its own), in one pass:
    the pieces' rows into their destinations, the rows between them into scratch, and the trailing CRC32C;
    True when the CRC matches the bytes."""
    views, position = [], base
    for first, dest in pieces:
        if first > position:
            views.append(memoryview(bytearray((first - position) * row_bytes)))
        views.append(memoryview(dest).cast("B"))
        position = first + len(dest)
    if position < base + chunk_rows:
        views.append(memoryview(bytearray((base + chunk_rows - position) * row_bytes)))
    trailer = memoryview(bytearray(4))
    if not _read_exactly(f, [*views, trailer], offset):
        return False
    crc = 0
    for view in views:
        crc = google_crc32c.extend(crc, np.frombuffer(view, np.uint8))  # (it refuses a writable memoryview)
    return crc == int.from_bytes(trailer, "little")


def _adjacent_stretches(pieces: list[tuple[int, np.ndarray]]) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first row, destinations) of each stretch of pieces (sorted by first row) that follow one another
    with no gap: one read each."""
    start, stretch, end = pieces[0][0], [], pieces[0][0]
    for first, dest in pieces:
        if first != end:
            yield start, stretch
            start, stretch = first, []
        stretch.append(dest)
        end = first + len(dest)
    yield start, stretch


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


def _read_exactly(f, views: list[memoryview], offset: int) -> bool:
    """Fill `views` in turn from the file at `offset`; False when the file ends first."""
    if not hasattr(os, "preadv"):
        f.seek(offset)
        return all(f.readinto(view) == len(view) for view in views)
    i = 0
    while i < len(views):
        got = os.preadv(f.fileno(), views[i : i + _IOV_MAX], offset)
        if got == 0:
            return False
        offset += got
        while i < len(views) and got >= len(views[i]):  # a short read leaves a view part-filled
            got -= len(views[i])
            i += 1
        if got:
            views[i] = views[i][got:]
    return True


def _check_arrays_match(group: zarr.Group, header: StoreHeader) -> None:
    """Every array the attributes name is there with readable metadata, and the row arrays match the
    attributes: width, chunking, enough rows (a header copied from another store, or edited, would
    otherwise read as garbage or fail as a bad checksum). Every damaged array is named."""
    arrays, damaged = {}, []
    for name in schema.array_names(header):
        try:
            arrays[name] = group.get(name)
        except Exception as e:  # a truncated or edited zarr.json: zarr raises JSON and validation errors
            damaged.append(f"{name}/zarr.json cannot be read ({type(e).__name__})")
            continue
        if not isinstance(arrays[name], zarr.Array):
            damaged.append(f"the array {name} is missing")
    if damaged:
        raise schema.damaged("; ".join(damaged))
    chunk_rows = header.chunk_rows
    for split in schema.SPLITS:
        committed = header.rows_committed(split)
        for hook in header.hooks:
            arr = arrays[schema.acts_path(split, hook)]
            width = header.width(hook)
            shape_ok = arr.ndim == 2 and arr.shape[1] == width and arr.shape[0] >= committed
            # readers find row i in chunk i // chunk_rows: true when the chunks are that size, or one holds all
            chunks_ok = arr.chunks[0] == chunk_rows or arr.shape[0] <= arr.chunks[0]
            if not (shape_ok and chunks_ok):
                raise schema.damaged(
                    f"the attributes disagree with the array {schema.acts_path(split, hook)} (shape {arr.shape}, "
                    f"chunks {arr.chunks}; attributes say width {width}, {committed:,} committed rows, "
                    f"{chunk_rows} rows per chunk)"
                )


def _check_normalizations(group: zarr.Group, header: StoreHeader) -> None:
    """Every recorded normalization can be used: rows normalized or inverted with a scale of 0, a negative
    one or a non-finite mean would be garbage, or NaN, with no error anywhere downstream."""
    for hook in header.hooks:
        try:
            norm = header.normalization(hook, group)
        except (KeyError, TypeError, ValueError) as e:
            raise schema.damaged(
                f"the normalization recorded for {hook} cannot be read ({type(e).__name__}: {e})"
            ) from None
        problem = None if norm is None else norm.problem()
        if problem is not None:
            raise schema.damaged(f"the normalization recorded for {hook} is not usable: {problem}")


def local_path(location: str) -> str:
    """file:// URLs as plain paths, so that local stores always get Zarr's LocalStore (and the direct
    chunk reader); every other location unchanged."""
    return location[len("file://") :] if location.startswith("file://") else location


def open_store(path: str | os.PathLike, concurrency: int | None = None) -> ActivationStore:
    return ActivationStore.open(path, concurrency)
