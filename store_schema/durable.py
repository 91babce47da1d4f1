"""Durable commits on a local filesystem.

A commit becomes visible when the root `zarr.json` is replaced. For a power cut to lose at most the
commit in flight, what that metadata points to must be on disk before it: the chunk files written since
the last commit, then the folders holding them (their names), then the metadata itself, written to a
temporary that is flushed before it is renamed into place, and finally the folder of that rename.
Object stores need none of this: a PUT is durable when it returns.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import zarr

from store_schema.shards import rows_per_file

PARTIAL_SUFFIX = ".partial"  # the suffix Zarr's local store gives its temporaries too


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush the files that exist among `paths`, then every folder holding one of them."""
    folders: dict[Path, None] = {}
    for path in paths:
        if path.exists():
            fsync_path(path)
            folders[path.parent] = None
    for folder in folders:
        fsync_path(folder)


def fsync_tree(root: Path) -> None:
    """Flush every file below `root`, then its folders from the deepest up, `root` included."""
    folders = []
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_path(Path(folder) / name)
        folders.append(Path(folder))
    for folder in reversed(folders):
        fsync_path(folder)


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: temporary, flush, rename, flush the folder."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def local_root(group: zarr.Group) -> Path | None:
    """The folder of a group in a local store; None for any other store (nothing to flush there)."""
    store = group.store
    return Path(store.root) if isinstance(store, zarr.storage.LocalStore) else None


def chunk_files(root: Path, arr: zarr.Array, first_row: int, stop_row: int) -> list[Path]:
    """The files (chunks, or shards of chunks) holding rows [first_row, stop_row) of a row array (chunked
    by rows only)."""
    if stop_row <= first_row:
        return []
    rows = rows_per_file(arr)
    tail = (0,) * (arr.ndim - 1)
    return [
        root / arr.path / arr.metadata.encode_chunk_key((chunk,) + tail)
        for chunk in range(first_row // rows, (stop_row - 1) // rows + 1)
    ]
