"""`saepipe store copy SRC DST`: copy a store between any two places fsspec reaches (local folders,
s3://, gs://, ...), resumably.

The store's files are copied as they are (chunks keep their checksums), `threads` at a time, and memory
stays bounded whatever the store's size (PIECE_BYTES). The root `zarr.json`, which holds the store's
header, is copied last: until then DST is not a store, so an interrupted copy is never mistaken for a
complete one. Running the same copy again skips every file already at DST with the same size, so an
interrupted copy resumes where it stopped.
"""

from __future__ import annotations

import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
from tqdm import tqdm

from store_schema import schema
from store_schema.reader import local_path, open_store

ROOT_METADATA = "zarr.json"
# Files up to this size (a chunk file of collect's 8,192 rows up to d_model 1,024) are copied whole, in
# one request each way; larger ones a piece at a time (S3 takes parts of 5 MiB and more). Each thread then
# holds at most about 4 pieces: a piece read and the client's copy of it, the piece being written and the
# client's buffered part. So memory stays under threads x 4 x PIECE_BYTES (512 MiB with 8 threads),
# whatever the store's size; with chunk files of c bytes (the usual case), about threads x 2 x c.
PIECE_BYTES = 16 << 20


def copy_store(src: str, dst: str, threads: int = 8, progress: bool = True) -> dict:
    """Copy; returns counts of files and bytes copied and skipped."""
    source = open_store(src)  # a store, and a complete one: never spread a half-collected store
    source.require_complete()
    src_fs, src_root = store_filesystem(src)
    dst_fs, dst_root = store_filesystem(dst)
    overlap = _overlap(_place(src, src_fs, src_root), _place(dst, dst_fs, dst_root))
    if overlap:
        raise schema.StoreError(
            f"cannot copy {src} to {dst}: {overlap}; a published store must not change: copy it to a folder "
            f"or URL outside it"
        )
    try:
        if dst_fs.isfile(dst_root):
            raise schema.StoreError(f"{dst} is a file: pass a folder or a URL for the copy")
        finished = dst_fs.exists(posixpath.join(dst_root, ROOT_METADATA))
        # what an unfinished destination holds: only an interrupted copy of this store may be there
        present = (
            set()
            if finished or not dst_fs.isdir(dst_root)
            else {posixpath.relpath(p, dst_root) for p in dst_fs.find(dst_root)}
        )
    except schema.StoreError:
        raise
    except Exception as e:  # each backend has its own errors: credentials, connection, permission
        raise schema.StoreError(
            f"cannot reach {dst} ({_first_line(e)}): check the URL, and the credentials in the environment (e.g. AWS_*)"
        ) from e
    if finished:  # a finished copy, or something else
        try:
            existing = open_store(dst).fingerprint
        except schema.StoreError:
            existing = None
        if existing != source.fingerprint:
            what = "another store" if existing else "a Zarr group that is not this store"
            raise schema.StoreError(f"{dst} already holds {what}: choose another destination")
    sizes = {path: info["size"] for path, info in src_fs.find(src_root, detail=True).items()}
    relative = {path: posixpath.relpath(path, src_root) for path in sizes}
    foreign = sorted(present - set(relative.values()))
    if foreign:
        raise schema.StoreError(
            f"{dst} holds files that are not part of this store ({foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): choose an "
            f"empty destination, or the one an interrupted copy of this store left"
        )
    last = [p for p in sizes if relative[p] == ROOT_METADATA]
    rest = [p for p in sizes if relative[p] != ROOT_METADATA]
    done = {"files_copied": 0, "bytes_copied": 0, "files_skipped": 0}
    counting = threading.Lock()
    unsized = None in sizes.values()  # an HTTP listing gives no sizes: nothing can be skipped then
    bar = tqdm(
        total=None if unsized else sum(sizes.values()),
        unit="B",
        unit_scale=True,
        desc="copy",
        disable=not progress,
        dynamic_ncols=True,
    )

    def copy(path: str) -> None:
        target = posixpath.join(dst_root, relative[path])
        size = sizes[path]
        skip = (
            size is not None
            and relative[path] != ROOT_METADATA
            and dst_fs.exists(target)
            and dst_fs.size(target) == size
        )
        if not skip:
            dst_fs.makedirs(posixpath.dirname(target), exist_ok=True)
            if size is not None and size > PIECE_BYTES:
                _stream_file(src_fs, path, dst_fs, target)
            else:  # a chunk file (chunk_rows x d_model x 2 bytes), or a file of unknown size (HTTP)
                data = src_fs.cat_file(path)
                size = len(data)
                dst_fs.pipe_file(target, data)
        with counting:
            done["files_skipped" if skip else "files_copied"] += 1
            done["bytes_copied"] += 0 if skip else size
            bar.update(size)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(copy, rest))
        for path in last:
            copy(path)
    except Exception as e:  # the backend's own error (network, credentials, a read-only destination)
        raise schema.StoreError(
            f"copying {src} to {dst} failed ({_first_line(e)}): fix that, then run the same command again to resume"
        ) from e
    finally:
        bar.close()
    return done


def _stream_file(src_fs, path: str, dst_fs, target: str) -> None:
    """Copy one large file a piece at a time: its size does not bound the copy's memory."""
    with src_fs.open(path, "rb", block_size=PIECE_BYTES, cache_type="none") as source:
        with dst_fs.open(target, "wb", block_size=PIECE_BYTES) as sink:
            while piece := source.read(PIECE_BYTES):
                sink.write(piece)


def _place(location: str, fs, root: str) -> str:
    """Where a location is, comparable with another: a resolved path, or protocol://bucket/key."""
    if "://" not in local_path(location):
        return str(Path(root).resolve())
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{root.strip('/')}"


def _overlap(src: str, dst: str) -> str | None:
    if src == dst:
        return "they are the same place"
    if dst.startswith(src.rstrip("/") + "/"):
        return "the destination is inside the store"
    if src.startswith(dst.rstrip("/") + "/"):
        return "the store is inside the destination"
    return None


def store_filesystem(location: str):
    """fsspec's filesystem and root path for a path or URL; a StoreError when fsspec cannot open it."""
    try:
        return fsspec.core.url_to_fs(local_path(location))
    except ImportError as e:  # fsspec names the backend a URL needs (s3fs, gcsfs, aiohttp)
        raise schema.StoreError(
            f"{location} needs a package that is not installed ({e}): pip install 'saepipe[remote]'"
        ) from None
    except ValueError as e:  # e.g. "Protocol not known"
        raise schema.StoreError(
            f"{location} is not a path or a URL fsspec knows ({e}): pass a folder, or a URL like s3://bucket/x.zarr"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
