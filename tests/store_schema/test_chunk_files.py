"""Chunk files written straight (store_schema.chunk_files): the very bytes Zarr writes, whole or in part,
checked before a partial write builds on them, and never left half-written."""

import errno
import os

import numpy as np
import pytest
import zarr

from store_schema import chunk_files, schema
from store_schema.chunk_files import ChunkFileWriter


def _array(root, name, rows, width, dtype, checksummed=True, shard_chunks=None):
    group = zarr.open_group(store=str(root), mode="a")
    return group.create_array(
        name,
        shape=(rows, width),
        dtype=dtype,
        chunks=(64, width),
        shards=None if shard_chunks is None else (64 * shard_chunks, width),
        compressors=schema.checksummed() if checksummed else (),
        fill_value=0,
    )


def _files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "dtype,checksummed,shard_chunks",
    [
        ("float16", True, None),
        ("float32", True, None),
        ("float16", False, None),
        ("float16", True, 2),
        ("float16", True, 3),
    ],
)
def test_writes_the_bytes_zarr_writes_whole_and_in_part(tmp_path, dtype, checksummed, shard_chunks):
    rng = np.random.default_rng(0)
    # blocks that start and end inside chunks and shards, one inside a single chunk, and a short last
    # chunk (in a short last shard)
    writes = [(0, 100), (100, 130), (130, 131), (131, 300), (300, 330)]
    data = rng.standard_normal((330, 24)).astype(dtype)
    ours = _array(tmp_path / "ours", "a", 330, 24, dtype, checksummed, shard_chunks)
    theirs = _array(tmp_path / "theirs", "a", 330, 24, dtype, checksummed, shard_chunks)
    writer = ChunkFileWriter(durable=True, threads=3)
    assert writer.handles(ours)
    for start, stop in writes:
        writer.write([(ours, start, data[start:stop])])
        with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):
            theirs[start:stop] = data[start:stop]
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours" / "a"))[:], data)
    assert not list((tmp_path / "ours").rglob("*.partial"))


def test_arrays_zarr_must_encode_are_left_to_zarr(tmp_path):
    group = zarr.open_group(store=str(tmp_path / "s"), mode="w")
    compressed = group.create_array("z", shape=(10, 4), dtype="int32", chunks=(5, 4))  # zstd by default
    split_rows = group.create_array("w", shape=(10, 4), dtype="float16", chunks=(5, 2), compressors=())
    writer = ChunkFileWriter(durable=False)
    assert not writer.handles(compressed) and not writer.handles(split_rows)


@pytest.mark.parametrize("shard_chunks,flipped", [(None, 5), (2, 5), (2, -7)])
def test_a_partial_write_over_a_damaged_chunk_is_refused_and_leaves_it(tmp_path, shard_chunks, flipped):
    arr = _array(tmp_path / "s", "a", 128, 8, "float16", shard_chunks=shard_chunks)
    writer = ChunkFileWriter(durable=False)
    writer.write([(arr, 0, np.ones((40, 8), np.float16))])
    chunk = tmp_path / "s" / "a" / "c" / "0" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[flipped] ^= 0xFF  # a row, or (at the end of a shard) its index
    chunk.write_bytes(bytes(damaged))
    what = "chunk" if shard_chunks is None else "shard"
    with pytest.raises(schema.StoreError, match=f"{what} 0 of a.*fails its checksum.*store verify"):
        writer.write([(arr, 40, np.ones((10, 8), np.float16))])
    assert chunk.read_bytes() == bytes(damaged)  # the damage stays for verify to find, not checksummed anew


@pytest.mark.parametrize("shard_chunks", [None, 2])
def test_a_failed_write_keeps_the_old_chunks_and_leaves_no_temporary(tmp_path, monkeypatch, shard_chunks):
    arr = _array(tmp_path / "s", "a", 256, 8, "float16", shard_chunks=shard_chunks)
    writer = ChunkFileWriter(durable=True, threads=2)
    writer.write([(arr, 0, np.ones((256, 8), np.float16))])
    before = _files(tmp_path / "s")
    real_pwritev, calls = os.pwritev, []

    def full_disk_at_the_second(fd, views, offset):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, views, offset)

    monkeypatch.setattr(chunk_files.os, "pwritev", full_disk_at_the_second)
    with pytest.raises(OSError, match="No space left"):
        writer.write([(arr, 0, np.full((256, 8), 2, np.float16))])
    assert not list((tmp_path / "s").rglob("*.partial"))
    assert _files(tmp_path / "s") == before  # a failed write replaces no file: every chunk is the old one
    assert len(calls) >= 4  # the other chunks were still written: nothing left in flight when it raised
