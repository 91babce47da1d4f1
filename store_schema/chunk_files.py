"""Chunks of the raw layout, written straight to their files, several at once.

A row array of the raw layout (`raw_layout`: plain little-endian rows, no compression or filters, then
optionally Zarr's CRC32C) stores each chunk as exactly its bytes and a 4-byte little-endian checksum, the
bytes Zarr's own pipeline would write: in a file of its own, or, when the array is sharded, as one of the
inner chunks of a shard file that ends with Zarr's index (store_schema.shards). Zarr writes chunks one
after another on one thread and copies each on the way (its crc32c codec appends the checksum to a copy
of the chunk); here a file is one `writev` of the rows as they lie in memory, their checksums and the
index, to a temporary renamed into place (as Zarr's local store does, so a reader never sees half a
file), and the files of a write go to a pool of threads, whose writes, flushes and checksums run outside
the GIL. Writing part of a file reads the rest of it first, as Zarr does; the part already there must
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

    def write(self, writes: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
        """Write each (array, first row, rows) of `writes` (arrays this writer `handles`); returns when every
        file is in place. Files are split across the threads; the first error is raised after all end."""
        jobs = []
        for arr, start, rows in writes:
            raw = self._describe(arr)
            rows = np.ascontiguousarray(rows, dtype=raw.dtype)
            if rows.shape[1:] != (raw.width,):
                raise ValueError(f"rows of width {rows.shape[1:]} for {raw.path}, whose rows are {raw.width} wide")
            stop, per_file = start + len(rows), raw.file_rows
            for index in range(start // per_file, (stop - 1) // per_file + 1 if len(rows) else 0):
                lo, hi = max(start, index * per_file), min(stop, (index + 1) * per_file)
                jobs.append((raw, index, arr.shape[0], lo - index * per_file, rows[lo - start : hi - start]))
        if len(jobs) <= 1 or self.threads <= 1:
            for job in jobs:
                _write_file(*job, durable=self.durable)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="saepipe-chunk-write")
        futures = [self._pool.submit(_write_file, *job, durable=self.durable) for job in jobs]
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


def _write_file(raw: _RawArray, index: int, array_rows: int, offset: int, rows: np.ndarray, durable: bool) -> None:
    """Write `rows` at row `offset` of file `index` (of an array of `array_rows` rows): the whole file
    anew, the rows and inner chunks it already held kept."""
    path = raw.file(index)
    # the inner chunks the file can hold: those of the array's chunk grid (a last shard has fewer)
    first_chunk = index * raw.shard_chunks
    in_grid = max(0, min(raw.shard_chunks, -(-array_rows // raw.chunk_rows) - first_chunk))
    covered = offset == 0 and len(rows) >= min(raw.file_rows, array_rows - index * raw.file_rows)
    held = {} if covered else _existing_chunks(raw, index, path)
    chunks = dict(held)
    for inner in range(offset // raw.chunk_rows, (offset + len(rows) - 1) // raw.chunk_rows + 1):
        lo, hi = max(offset, inner * raw.chunk_rows), min(offset + len(rows), (inner + 1) * raw.chunk_rows)
        part = rows[lo - offset : hi - offset]
        if hi - lo == raw.chunk_rows:
            chunks[inner] = part
            continue
        body = held.get(inner)
        body = np.full((raw.chunk_rows, raw.width), raw.fill_value, raw.dtype) if body is None else body.copy()
        body[lo - inner * raw.chunk_rows : hi - inner * raw.chunk_rows] = part
        chunks[inner] = body
    if raw.sharded and any(inner >= in_grid for inner in chunks):
        raise ValueError(f"rows past the end of {raw.path}'s {array_rows:,} rows")
    pieces = []
    for inner in sorted(chunks):
        data = chunks[inner].reshape(-1).view(np.uint8)  # (google_crc32c refuses a writable memoryview)
        pieces.append(data)
        if raw.checksummed:
            pieces.append(google_crc32c.value(data).to_bytes(4, "little"))
    if raw.sharded:
        present = [inner in chunks for inner in range(raw.shard_chunks)]
        pieces += shards.encode_index(shards.sequential_entries(present, raw.stored_chunk_bytes))
    _replace_file(path, pieces, durable)


def _replace_file(path: Path, pieces: list, durable: bool) -> None:
    """Write `pieces` to a temporary beside `path` (flushed when `durable`) and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, pieces)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _write_all(fd: int, pieces: list) -> None:
    """Write every byte of `pieces` in order (writev may write less than asked)."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
