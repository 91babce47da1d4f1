"""Chunks of the raw layout, written straight to their files, several at once.

A row array of the raw layout (`raw_layout`: plain little-endian rows, no compression or filters, then
optionally Zarr's CRC32C) stores each chunk as exactly its bytes and a 4-byte little-endian checksum, the
bytes Zarr's own pipeline would write: in a file of its own, or, when the array is sharded, as one of the
inner chunks of a shard file that ends with Zarr's index (store_schema.shards). Zarr writes chunks one
after another on one thread and copies each on the way (its crc32c codec appends the checksum to a copy
of the chunk); here each chunk is one `pwritev` of the rows as they lie in memory and their checksum, at
its offset in a temporary file, the chunks of a write (a shard's too) side by side on a pool of threads,
whose writes, flushes and checksums run outside the GIL. Then each file gets its index (a shard), is
flushed, and is renamed into place (as Zarr's local store does, so a reader never sees half a file). Writing part of a file reads the rest of it first, as Zarr does; the part already there must
pass its checksums, or the store is damaged and nothing is written over it.
"""

from __future__ import annotations

import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from store_schema import schema, shards
from store_schema.durable import PARTIAL_SUFFIX

WRITE_THREADS = min(8, os.cpu_count() or 1)  # enough to keep a local disk busy; each holds one file at most
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


def is_checksummed(arr: zarr.Array) -> bool:
    return any(isinstance(codec, Crc32cCodec) for codec in arr.compressors)


def raw_layout(arr: zarr.Array) -> bool:
    """Whether the array's chunks are plain little-endian bytes with no compression or filters (optionally
    followed by Zarr's crc32c checksum), whole rows each, in files of their own or in shards that end with
    a checksummed index: such a chunk is exactly the rows' bytes, so it is read and written without
    Zarr's codec pipeline and its copies. (For a sharded array Zarr reports the inner chunks' codecs.)"""
    serializer = arr.serializer
    only_checksum = len(arr.compressors) == 1 and is_checksummed(arr)
    return not (
        (arr.compressors and not only_checksum)
        or arr.filters
        or not isinstance(serializer, BytesCodec)
        or serializer.endian is None
        or serializer.endian.value != sys.byteorder
        or len(arr.shape) != 2
        or arr.chunks[1] != arr.shape[1]
        or (arr.shards is not None and (arr.shards[1] != arr.shape[1] or not shards.index_at_end(arr)))
    )


@dataclass(frozen=True)
class _RawArray:
    """What writing a raw-layout array's files needs (none of it changes when the array grows)."""

    folder: Path  # the store's root: chunk keys are relative to it
    path: str
    metadata: object  # encodes chunk keys
    chunk_rows: int
    shard_chunks: int  # inner chunks per file: 1 when the array is not sharded
    sharded: bool  # files are shards, ending with their index
    width: int
    dtype: np.dtype
    fill_value: object
    checksummed: bool

    @property
    def file_rows(self) -> int:
        return self.chunk_rows * self.shard_chunks

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.width * self.dtype.itemsize

    @property
    def stored_chunk_bytes(self) -> int:
        """An inner chunk as stored: its rows and, when checksummed, their CRC32C."""
        return self.chunk_bytes + 4 * self.checksummed

    def file(self, index: int) -> Path:
        return self.folder / self.path / self.metadata.encode_chunk_key((index, 0))


class ChunkFileWriter:
    """Writes rows into the files of local raw-layout arrays, on `threads` threads. `durable`: each file
    is flushed before it is renamed into place (a commit then only flushes the folders)."""

    def __init__(self, durable: bool, threads: int = WRITE_THREADS):
        self.durable, self.threads = durable, threads
        self._arrays: dict[str, _RawArray | None] = {}
        self._pool: ThreadPoolExecutor | None = None

    def handles(self, arr: zarr.Array) -> bool:
        """Whether `arr`'s chunks are written here (a local array of the raw layout), not through Zarr."""
        return self._describe(arr) is not None

    def write(self, writes: list[tuple[zarr.Array, int, np.ndarray | list[np.ndarray]]]) -> None:
        """Write each (array, first row, rows) of `writes` (arrays this writer `handles`); `rows` is an array
        or the arrays that follow one another (written as one, never joined in memory). Returns when every
        file is in place. Files are split across the threads; the first error is raised after all end."""
        jobs = []
        for arr, start, rows in writes:
            raw = self._describe(arr)
            segments = [np.ascontiguousarray(part, dtype=raw.dtype) for part in _as_list(rows) if len(part)]
            if any(part.shape[1:] != (raw.width,) for part in segments):
                raise ValueError(f"rows of another width for {raw.path}, whose rows are {raw.width} wide")
            stop, per_file = start + sum(len(part) for part in segments), raw.file_rows
            for index in range(start // per_file, (stop - 1) // per_file + 1 if stop > start else 0):
                lo, hi = max(start, index * per_file), min(stop, (index + 1) * per_file)
                parts = _rows_between(segments, lo - start, hi - start)
                jobs.append((raw, index, arr.shape[0], lo - index * per_file, parts))
        files = [_planned_file(*job) for job in jobs]  # reads what a partial write keeps (rare): here
        try:
            for file in files:
                file.open()
            # every inner chunk of every file on the threads (a shard's chunks side by side, as the files
            # of an unsharded array), then each file's index, flush and close
            self._each(_write_chunk, [(file, place) for file in files for place in range(len(file.chunks))])
            self._each(_finish_file, [(file, self.durable) for file in files])
            for file in files:
                os.replace(file.tmp, file.path)
        except BaseException:
            for file in files:
                file.discard()
            raise

    def _each(self, fn, calls: list[tuple]) -> None:
        """fn(*call) for every call, on the threads; returns when all have ended, raising the first error."""
        if len(calls) <= 1 or self.threads <= 1:
            for call in calls:
                fn(*call)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="saepipe-chunk-write")
        futures = [self._pool.submit(fn, *call) for call in calls]
        errors = [future.exception() for future in futures]  # waits for every one: no write left in flight
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _describe(self, arr: zarr.Array) -> _RawArray | None:
        raw = self._arrays.get(arr.path, ...)
        if raw is ...:
            raw = None
            if isinstance(arr.store, LocalStore) and raw_layout(arr):
                raw = _RawArray(
                    Path(arr.store.root),
                    arr.path,
                    arr.metadata,
                    arr.chunks[0],
                    shards.shard_chunks(arr),
                    arr.shards is not None,
                    arr.shape[1],
                    arr.dtype,
                    arr.fill_value,
                    is_checksummed(arr),
                )
            self._arrays[arr.path] = raw
        return raw


@dataclass
class _PlannedFile:
    """One file about to be written anew: its inner chunks (each the row arrays that make it up, at its
    byte offset) and its index, written to a temporary that replaces the file once all is written."""

    path: Path
    chunks: list[tuple[int, list[np.ndarray]]]  # (byte offset, the chunk's rows in parts)
    checksummed: bool
    index: list[bytes]  # the shard's index and its CRC32C (nothing when the array is not sharded)
    tmp: Path | None = None
    fd: int | None = None

    def open(self) -> None:
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @property
    def end(self) -> int:
        """Where the chunks end (and the index begins)."""
        offset, parts = self.chunks[-1]
        return offset + sum(part.nbytes for part in parts) + 4 * self.checksummed

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def _planned_file(raw: _RawArray, index: int, array_rows: int, offset: int, rows: list[np.ndarray]) -> _PlannedFile:
    """What writing `rows` (arrays that follow one another) at row `offset` of file `index` (of an array of
    `array_rows` rows) makes of the file: the whole file anew, the rows and inner chunks it held kept."""
    path = raw.file(index)
    n = sum(len(part) for part in rows)
    # the inner chunks the file can hold: those of the array's chunk grid (a last shard has fewer)
    first_chunk = index * raw.shard_chunks
    in_grid = max(0, min(raw.shard_chunks, -(-array_rows // raw.chunk_rows) - first_chunk))
    covered = offset == 0 and n >= min(raw.file_rows, array_rows - index * raw.file_rows)
    held = {} if covered else _existing_chunks(raw, index, path)
    chunks: dict[int, list[np.ndarray]] = {inner: [body] for inner, body in held.items()}
    for inner in range(offset // raw.chunk_rows, (offset + n - 1) // raw.chunk_rows + 1):
        lo, hi = max(offset, inner * raw.chunk_rows), min(offset + n, (inner + 1) * raw.chunk_rows)
        parts = _rows_between(rows, lo - offset, hi - offset)
        if hi - lo == raw.chunk_rows:
            chunks[inner] = parts
            continue
        body = held.get(inner)
        body = np.full((raw.chunk_rows, raw.width), raw.fill_value, raw.dtype) if body is None else body.copy()
        body[lo - inner * raw.chunk_rows : hi - inner * raw.chunk_rows] = np.concatenate(parts)
        chunks[inner] = [body]
    if raw.sharded and any(inner >= in_grid for inner in chunks):
        raise ValueError(f"rows past the end of {raw.path}'s {array_rows:,} rows")
    present = [inner in chunks for inner in range(raw.shard_chunks)]
    entries = shards.sequential_entries(present, raw.stored_chunk_bytes)
    placed = [(int(entries[inner][0]) if raw.sharded else 0, chunks[inner]) for inner in sorted(chunks)]
    return _PlannedFile(path, placed, raw.checksummed, shards.encode_index(entries) if raw.sharded else [])


def _write_chunk(file: _PlannedFile, place: int) -> None:
    """Write inner chunk `place` of `file` (its rows, then their CRC32C) at its offset in the temporary."""
    offset, parts = file.chunks[place]
    pieces, crc = [], 0
    for part in parts:
        data = part.reshape(-1).view(np.uint8)  # (google_crc32c refuses a writable memoryview)
        pieces.append(data)
        crc = google_crc32c.extend(crc, data) if file.checksummed else crc
    if file.checksummed:
        pieces.append(crc.to_bytes(4, "little"))
    _write_all(file.fd, pieces, offset)


def _finish_file(file: _PlannedFile, durable: bool) -> None:
    """Write the file's index after its chunks, flush it when `durable`, and close it."""
    if file.index:
        _write_all(file.fd, file.index, file.end)
    if durable:
        os.fsync(file.fd)
    os.close(file.fd)
    file.fd = None


def _as_list(rows: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    return list(rows) if isinstance(rows, (list, tuple)) else [rows]


def _rows_between(segments: list[np.ndarray], lo: int, hi: int) -> list[np.ndarray]:
    """Views of rows [lo, hi) of `segments` taken as one run of rows."""
    parts, start = [], 0
    for part in segments:
        a, b = max(lo, start), min(hi, start + len(part))
        if a < b:
            parts.append(part[a - start : b - start])
        start += len(part)
    return parts


def _existing_chunks(raw: _RawArray, index: int, path: Path) -> dict[int, np.ndarray]:
    """The inner chunks file `index` holds (each [chunk_rows, width], checked), by their place in it; none
    when the file does not exist yet."""
    try:
        data = np.frombuffer(path.read_bytes(), np.uint8)
    except FileNotFoundError:
        return {}
    what = "shard" if raw.sharded else "chunk"
    damaged = schema.damaged(f"{what} {index} of {raw.path}, written to in part, fails its checksum (or is truncated)")
    if not raw.sharded:
        return {0: _checked_chunk(raw, data, damaged)}
    entries = shards.decode_index(data[-shards.index_bytes(raw.shard_chunks) :], raw.shard_chunks)
    if entries is None:
        raise damaged
    held = {}
    for inner, (start, nbytes) in enumerate(entries):
        if start == shards.ABSENT:
            continue
        held[inner] = _checked_chunk(raw, data[int(start) : int(start) + int(nbytes)], damaged)
    return held


def _checked_chunk(raw: _RawArray, data: np.ndarray, damaged: Exception) -> np.ndarray:
    """A stored inner chunk's rows, once its length and CRC32C are checked."""
    size = raw.chunk_bytes
    if len(data) != raw.stored_chunk_bytes or (
        raw.checksummed and google_crc32c.value(data[:size]) != int.from_bytes(data[size:].tobytes(), "little")
    ):
        raise damaged
    return data[:size].view(raw.dtype).reshape(raw.chunk_rows, raw.width)


def _write_all(fd: int, pieces: list, offset: int) -> None:
    """Write every byte of `pieces` in order from `offset` (pwritev may write less than asked)."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
