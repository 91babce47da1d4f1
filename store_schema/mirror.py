"""A store collected straight into S3: a small local staging store, mirrored to the bucket at every commit.

The collect writes its staging store as it would any store. After each commit of the staging store's
root metadata, `RemoteMirror.sync`:
1. uploads every staging file that changed since it was last uploaded (chunks, array metadata), many
   at once;
2. writes the root metadata to the bucket: the remote commit, one PUT, visible to readers all at once.
   It is conditional on the ETag of the root this writer last wrote (If-Match; If-None-Match for the
   first), so a writer whose lease was taken can never commit over the one that took it;
3. deletes from the staging store the row chunks wholly below the committed rows: the collect never
   writes them again, and the bucket holds them. Local scratch is thus the store's small arrays and
   metadata, its tokens (4 bytes a token) and about one block of rows, whatever the store's size.

A collect that resumes rebuilds the staging store from the bucket (`rebuild`): every object but the
committed full row chunks. Collect is deterministic, so rows it writes again are the same bytes."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from store_schema import schema
from store_schema.header import StoreHeader
from store_schema.lease import ObjectLease, conditional_put

ROOT_METADATA = "zarr.json"


class RemoteMirror:
    def __init__(self, fs, remote_root: str, url: str, staging: Path, lease: ObjectLease, threads: int = 16):
        self.fs, self.remote_root, self.url, self.staging, self.lease = fs, remote_root, url, staging, lease
        self.threads = threads
        self.bucket, self.root_key, _ = fs.split_path(posixpath.join(remote_root, ROOT_METADATA))
        self.root_etag: str | None = None  # of the remote root this writer last wrote or found
        self._synced: dict[str, tuple[int, int, int]] = {}  # staging file -> state (_state) the bucket holds
        self._etags: dict[str, str] = {}  # staging file -> ETag of the object this writer last wrote or found

    # -- the remote commit --------------------------------------------------------------------------
    def sync(self, writer) -> None:
        """Mirror the staging store after a commit of its root metadata (see the module docstring)."""
        self.lease.confirm()  # a writer that lost its lease must not upload a single chunk
        changed = [path for path, state in self._staging_files().items() if self._synced.get(path) != state]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            list(pool.map(self._upload, changed))
        self._commit_root()
        self._drop_committed_chunks(writer)

    def _upload(self, relative: str) -> None:
        """Upload one file, conditionally: over the object this writer last wrote there (If-Match), or
        where there is none (If-None-Match). A writer whose lease was taken thus never overwrites what the
        new holder wrote; the holder overwrites what a stale writer left, once it has confirmed its lease."""
        local = self.staging / relative
        state, body = _state(local), local.read_bytes()  # one chunk: bounded by chunk size x threads
        key = posixpath.join(self.remote_root, relative)
        etag = self._etags.get(relative)
        while True:
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                response = self._put(key, body, condition)
                break
            except schema.StoreError:
                self.lease.confirm()  # raises when the object is the new holder's; else it is a stale one's
                etag = self._remote_etag(key)
        self._etags[relative] = response["ETag"]
        self._synced[relative] = state

    def _put(self, key: str, body: bytes, condition: dict) -> dict:
        """A conditional PUT; a StoreError when its condition fails."""
        response = conditional_put(self.fs, key, body, condition)
        if response is None:
            raise schema.StoreError(f"{key} changed under this collect")
        return response

    def _remote_etag(self, key: str) -> str | None:
        bucket, object_key, _ = self.fs.split_path(key)
        try:
            return self.fs.call_s3("head_object", Bucket=bucket, Key=object_key)["ETag"]
        except FileNotFoundError:
            return None

    def _commit_root(self) -> None:
        condition = {"IfMatch": self.root_etag} if self.root_etag else {"IfNoneMatch": "*"}
        body = (self.staging / ROOT_METADATA).read_bytes()
        try:
            response = self._put(posixpath.join(self.remote_root, ROOT_METADATA), body, condition)
        except schema.StoreError:
            raise schema.StoreError(
                f"another collect committed to {self.url} since this one last did (its lease was taken): "
                f"this collect stopped; its committed blocks are in the store, and the other collect carries on"
            ) from None
        self.root_etag = response["ETag"]

    def _drop_committed_chunks(self, writer) -> None:
        """Delete the staging copies of the row chunks wholly below each split's committed rows."""
        for split in schema.SPLITS:
            full = writer.progress(split).rows_committed // writer.chunk_rows(split)
            for name in schema.row_array_names(writer.header, split):
                arr = writer.group[name]
                for chunk in range(full):
                    key = posixpath.join(name, arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1)))
                    if key in self._synced and self._synced[key] != _IN_BUCKET_ONLY:
                        (self.staging / key).unlink(missing_ok=True)
                        self._synced[key] = _IN_BUCKET_ONLY  # never written again: its ETag is not needed
                        self._etags.pop(key, None)

    def _staging_files(self) -> dict[str, tuple[int, int, int]]:
        """Every file of the staging store but its root metadata and Zarr's in-flight temporaries."""
        found = {}
        for folder, _, files in os.walk(self.staging):
            for name in files:
                relative = os.path.relpath(os.path.join(folder, name), self.staging).replace(os.sep, "/")
                if relative != ROOT_METADATA and not name.endswith(".partial"):
                    found[relative] = _state(self.staging / relative)
        return found

    # -- resuming from the bucket -------------------------------------------------------------------
    def remote_header(self) -> StoreHeader | None:
        """The remote store's header, or None when the bucket holds no root metadata there yet."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.root_key)
            root = json.loads(self.fs.cat_file(posixpath.join(self.remote_root, ROOT_METADATA)))
        except FileNotFoundError:
            self._note_leftovers()
            return None
        self.root_etag = head["ETag"]
        return StoreHeader.from_attrs(root.get("attributes", {}).get(schema.ATTRS_KEY))

    def _note_leftovers(self) -> None:
        """The ETags of objects a collect killed before its first commit left: this one overwrites them."""
        self.fs.invalidate_cache(self.remote_root)  # listings are cached; the bucket may have changed
        if self.fs.exists(self.remote_root):
            for path, info in self.fs.find(self.remote_root, detail=True).items():
                self._etags[posixpath.relpath(path, self.remote_root)] = info["ETag"]

    def rebuild(self, header: StoreHeader) -> None:
        """Replace the staging store by the bucket's store (`header`: its header), all but its committed
        full row chunks, which the collect will not write again."""
        shutil.rmtree(self.staging, ignore_errors=True)
        full = {split: header.rows_committed(split) // header.chunk_rows for split in schema.SPLITS}
        skipped = {
            f"{name}/c/": full[split] for split in schema.SPLITS for name in schema.row_array_names(header, split)
        }
        wanted = []
        self.fs.invalidate_cache(self.remote_root)
        for path, info in self.fs.find(self.remote_root, detail=True).items():
            relative = posixpath.relpath(path, self.remote_root)
            prefix = next((p for p in skipped if relative.startswith(p)), None)
            if prefix is not None and int(relative[len(prefix) :].split("/")[0]) < skipped[prefix]:
                self._synced[relative] = _IN_BUCKET_ONLY
                continue
            wanted.append(relative)
            self._etags[relative] = info["ETag"]

        def download(relative: str) -> None:
            local = self.staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(posixpath.join(self.remote_root, relative), str(local))
            if relative != ROOT_METADATA:
                self._synced[relative] = _state(local)

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            list(pool.map(download, wanted))


_IN_BUCKET_ONLY = (-1, -1, -1)  # the _state of a committed full row chunk: deleted here, kept by the bucket


def _state(path: Path) -> tuple[int, int, int]:
    """What tells a rewritten file from the one uploaded: Zarr writes each file anew (temporary + rename),
    so its inode changes even when its size and (coarse) mtime do not."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino
