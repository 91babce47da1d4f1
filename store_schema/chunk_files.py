"""Chunks of the raw layout, written straight to their files, several at once.

A row array of the raw layout (`raw_layout`: plain little-endian rows, no compression or sharding, then
optionally Zarr's CRC32C) stores each chunk as exactly its bytes and a 4-byte little-endian checksum, the
file Zarr's own pipeline would write. Zarr writes chunks one after another on one thread and copies each
on the way (its crc32c codec appends the checksum to a copy of the chunk); here a chunk is one `writev`
of the rows as they lie in memory and their checksum, to a temporary renamed into place (as Zarr's local
store does, so a reader never sees half a file), and the chunks of a write go to a pool of threads, whose
writes, flushes and checksums run outside the GIL. Writing part of a chunk reads the rest of it first,
as Zarr does; the part already there must pass its checksum, or the store is damaged and nothing is
written over it.
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

from store_schema import schema
from store_schema.durable import PARTIAL_SUFFIX

WRITE_THREADS = min(8, os.cpu_count() or 1)  # enough to keep a local disk busy; each holds one chunk at most


def is_checksummed(arr: zarr.Array) -> bool:
    return any(isinstance(codec, Crc32cCodec) for codec in arr.compressors)


def raw_layout(arr: zarr.Array) -> bool:
    """Whether the array's chunks are plain little-endian bytes with no compression, filters or sharding
    (optionally followed by Zarr's crc32c checksum), whole rows each: such a chunk (file or object) is
    exactly the rows' bytes, so it is read and written without Zarr's codec pipeline and its copies."""
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
    )


@dataclass(frozen=True)
class _RawArray:
    """What writing a raw-layout array's chunk files needs (none of it changes when the array grows)."""

    folder: Path  # the store's root: chunk keys are relative to it
    path: str
    metadata: object  # encodes chunk keys
    chunk_rows: int
    width: int
    dtype: np.dtype
    fill_value: object
    checksummed: bool

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.width * self.dtype.itemsize

    def file(self, chunk: int) -> Path:
        return self.folder / self.path / self.metadata.encode_chunk_key((chunk, 0))


class ChunkFileWriter:
    """Writes rows into the chunk files of local raw-layout arrays, on `threads` threads. `durable`: each
    file is flushed before it is renamed into place (a commit then only flushes the folders)."""

    def __init__(self, durable: bool, threads: int = WRITE_THREADS):
        self.durable, self.threads = durable, threads
        self._arrays: dict[str, _RawArray | None] = {}
        self._pool: ThreadPoolExecutor | None = None

    def handles(self, arr: zarr.Array) -> bool:
        """Whether `arr`'s chunks are written here (a local array of the raw layout), not through Zarr."""
        return self._describe(arr) is not None

    def write(self, writes: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
        """Write each (array, first row, rows) of `writes` (arrays this writer `handles`); returns when every
        chunk is in place. Chunks are split across the threads; the first error is raised after all end."""
        jobs = []
        for arr, start, rows in writes:
            raw = self._describe(arr)
            rows = np.ascontiguousarray(rows, dtype=raw.dtype)
            if rows.shape[1:] != (raw.width,):
                raise ValueError(f"rows of width {rows.shape[1:]} for {raw.path}, whose rows are {raw.width} wide")
            stop = start + len(rows)
            for chunk in range(start // raw.chunk_rows, (stop - 1) // raw.chunk_rows + 1 if len(rows) else 0):
                lo, hi = max(start, chunk * raw.chunk_rows), min(stop, (chunk + 1) * raw.chunk_rows)
                jobs.append((raw, chunk, lo - chunk * raw.chunk_rows, rows[lo - start : hi - start]))
        if len(jobs) <= 1 or self.threads <= 1:
            for job in jobs:
                _write_chunk(*job, durable=self.durable)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="saepipe-chunk-write")
        futures = [self._pool.submit(_write_chunk, *job, durable=self.durable) for job in jobs]
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
                    arr.shape[1],
                    arr.dtype,
                    arr.fill_value,
                    is_checksummed(arr),
                )
            self._arrays[arr.path] = raw
        return raw


def _write_chunk(raw: _RawArray, chunk: int, offset: int, rows: np.ndarray, durable: bool) -> None:
    """Write `rows` at row `offset` of the chunk: the whole chunk file anew, its other rows kept."""
    path = raw.file(chunk)
    if offset == 0 and len(rows) == raw.chunk_rows:
        body = rows
    else:
        body = _existing_rows(raw, chunk, path)
        body[offset : offset + len(rows)] = rows
    data = body.reshape(-1).view(np.uint8)  # (google_crc32c refuses a writable memoryview; an array it takes)
    pieces = [data]
    if raw.checksummed:
        pieces.append(google_crc32c.value(data).to_bytes(4, "little"))
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


def _existing_rows(raw: _RawArray, chunk: int, path: Path) -> np.ndarray:
    """The chunk's rows as its file holds them (checked), or the fill value where it has none yet."""
    try:
        data = np.frombuffer(path.read_bytes(), np.uint8)
    except FileNotFoundError:
        return np.full((raw.chunk_rows, raw.width), raw.fill_value, raw.dtype)
    size = raw.chunk_bytes
    if len(data) != size + 4 * raw.checksummed or (
        raw.checksummed and google_crc32c.value(data[:size]) != int.from_bytes(data[size:].tobytes(), "little")
    ):
        raise schema.damaged(f"chunk {chunk} of {raw.path}, written to in part, fails its checksum (or is truncated)")
    return data[:size].view(raw.dtype).reshape(raw.chunk_rows, raw.width).copy()


def _write_all(fd: int, pieces: list) -> None:
    """Write every byte of `pieces` in order (writev may write less than asked)."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
