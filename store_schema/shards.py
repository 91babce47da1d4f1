"""Zarr v3 shards of the raw layout: where each inner chunk of a shard file lies, and the index that says so.

A sharded row array keeps `shard_chunks` chunks of rows in one file (object), so that a store of a
billion rows is thousands of files, not hundreds of thousands. Its inner chunks keep the raw layout
(`chunk_files.raw_layout`: the rows' bytes, then their CRC32C), and the shard ends with Zarr's index
(`index_location: end`): per inner chunk, its byte offset and length as two little-endian uint64
(both 2**64 - 1 for a chunk the shard does not hold), then the CRC32C of the index. Anything that reads
Zarr v3 reads such a shard; saepipe writes and reads it without Zarr's codec pipeline, an inner chunk
at a time, as it does unsharded chunk files.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import ShardingCodec

ABSENT = np.uint64(2**64 - 1)  # an index entry of an inner chunk the shard does not hold
_ENTRY_BYTES = 16


def shard_chunks(arr: zarr.Array) -> int:
    """Inner chunks per file of a row array (chunked by rows only): 1 when it is not sharded."""
    return 1 if arr.shards is None else arr.shards[0] // arr.chunks[0]


def rows_per_file(arr: zarr.Array) -> int:
    """Rows held by one file (shard, or chunk when the array is not sharded)."""
    return arr.chunks[0] * shard_chunks(arr)


def index_at_end(arr: zarr.Array) -> bool:
    """Whether the array's shards end with their index, checksummed (what saepipe reads itself)."""
    codec = arr.metadata.codecs[0] if arr.metadata.codecs else None
    if not isinstance(codec, ShardingCodec):
        return False
    names = [type(c).__name__ for c in codec.index_codecs]
    return codec.index_location.value == "end" and names == ["BytesCodec", "Crc32cCodec"]


def index_bytes(n_chunks: int) -> int:
    """The size of the index that ends a shard of `n_chunks` inner chunks, its CRC32C included."""
    return _ENTRY_BYTES * n_chunks + 4


def encode_index(entries: np.ndarray) -> list[bytes]:
    """The bytes that end a shard: `entries` ([n, 2] uint64 offset and length) and their CRC32C."""
    body = np.ascontiguousarray(entries, dtype="<u8").tobytes()
    return [body, google_crc32c.value(body).to_bytes(4, "little")]


def decode_index(data: bytes | memoryview, n_chunks: int) -> np.ndarray | None:
    """The [n_chunks, 2] (offset, length) entries of a shard's index (the file's last
    `index_bytes(n_chunks)` bytes); None when they fail their checksum or are too short."""
    if len(data) != index_bytes(n_chunks):
        return None
    body = bytes(data[:-4])
    if google_crc32c.value(body) != int.from_bytes(bytes(data[-4:]), "little"):
        return None
    return np.frombuffer(body, "<u8").reshape(n_chunks, 2)


def sequential_entries(present: list[bool], chunk_nbytes: int) -> np.ndarray:
    """The index of a shard whose present inner chunks (each `chunk_nbytes` long) follow one another
    from the file's start, in chunk order, as saepipe (and Zarr) write them."""
    entries = np.full((len(present), 2), ABSENT, dtype=np.uint64)
    offset = 0
    for i, here in enumerate(present):
        if here:
            entries[i] = (offset, chunk_nbytes)
            offset += chunk_nbytes
    return entries
