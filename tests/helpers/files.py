"""Files and folders the tests read: the repository's own, and what a store holds on disk."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/helpers/files.py is two folders down


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (a store), by its relative path: two trees are equal file for file, with no
    stray file in either."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def inner_chunk(store: Path, name: str, chunk: int) -> tuple[Path, int]:
    """(file, byte offset) of chunk `chunk` of row array `name` in a local store: its own file, or its
    place in its shard, read from the shard's index as any Zarr reader finds it."""
    import zarr

    from store_schema import shards

    arr = zarr.open_array(str(store / name), mode="r")
    per_shard = shards.shard_chunks(arr)
    path = store / name / arr.metadata.encode_chunk_key((chunk // per_shard,) + (0,) * (arr.ndim - 1))
    if arr.shards is None:
        return path, 0
    data = path.read_bytes()
    entries = shards.decode_index(data[-shards.index_bytes(per_shard) :], per_shard)
    return path, int(entries[chunk % per_shard][0])


def rewrite_checksummed(chunk: Path, data: bytes) -> None:
    """Replace a checksummed chunk file's bytes, checksum and all, as a tool that rewrites chunks would: the
    chunk then passes its checksum, and only what verify, training or eval know beyond it can find the change."""
    import google_crc32c

    chunk.write_bytes(data + google_crc32c.value(data).to_bytes(4, "little"))


def poison_chunk(chunk: Path, values: int, value: float) -> None:
    """Set the first `values` fp16 values of a raw checksummed chunk file to `value` (inf, NaN), checksummed
    anew (rewrite_checksummed)."""
    import numpy as np

    rows = np.frombuffer(chunk.read_bytes()[:-4], np.float16).copy()
    rows[:values] = value
    rewrite_checksummed(chunk, rows.tobytes())
