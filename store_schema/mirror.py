"""A store collected straight into S3: a small local staging store, mirrored to the bucket at every commit.

The collect writes its staging store as it would any store. After each commit of the staging store's
root metadata, `RemoteMirror.sync` notes what the commit changed and hands it to a background thread,
which, while the collect goes on to its next block:
1. uploads every staging file the commit changed (chunks, array metadata), many at once;
2. then writes the commit's root metadata to the bucket (the bytes the staging store had at that
   commit): the remote commit, one PUT, visible to readers all at once. It is conditional on the ETag
   of the root this writer last wrote (If-Match; If-None-Match for the first), so a writer whose lease
   was taken can never commit over the one that took it;
3. deletes from the staging store the row files (chunks, or shards of chunks) wholly below that commit's
   rows and the token files: the collect never writes them again (nor reads the tokens: it read them
   once, before its first commit), and the bucket holds them. Local scratch is thus the store's small
   arrays and metadata, the collect's own scratch copy of the tokens (4 bytes a token) and about two
   blocks of rows, whatever the store's size.

One commit is in flight at a time: the next `sync` waits for it. So the bucket takes the commits in
order, each only once its files are there, and no upload overwrites an object the bucket's root names:
a commit's files are those it changed when it was made (the running sums go to a slot its predecessor's
root does not name), and the collect cannot make a second commit, which might reuse that slot, before
this one is in the bucket. The first error of the background work is raised by
the next `sync` or by `flush` (which waits for the last commit) and stops the collect; no later commit
reaches the bucket.

A collect that resumes rebuilds the staging store from the bucket (`rebuild`): every object but the
committed full row files. Collect is deterministic, so rows it writes again are the same bytes."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from store_schema import schema
from store_schema.header import StoreHeader
from store_schema.lease import ObjectLease, conditional_put
from store_schema.shards import rows_per_file

ROOT_METADATA = "zarr.json"


class RemoteMirror:
    def __init__(self, fs, remote_root: str, url: str, staging: Path, lease: ObjectLease, threads: int = 16):
        self.fs, self.remote_root, self.url, self.staging, self.lease = fs, remote_root, url, staging, lease
        self.threads = threads
        self.bucket, self.root_key, _ = fs.split_path(posixpath.join(remote_root, ROOT_METADATA))
        self.root_etag: str | None = None  # of the remote root this writer last wrote or found
        self._synced: dict[str, tuple[int, int, int]] = {}  # staging file -> state (_state) the bucket holds
        self._asked: dict[str, tuple[int, int, int]] = {}  # staging file -> its state when last handed over
        self._etags: dict[str, str] = {}  # staging file -> ETag of the object this writer last wrote or found
        self._lock = threading.Lock()  # the dicts above: the collect's thread and the mirror's share them
        self._uploads: ThreadPoolExecutor | None = None
        self._committer: ThreadPoolExecutor | None = None  # the background thread: one remote commit at a time
        self._in_flight: Future | None = None

    # -- the remote commit --------------------------------------------------------------------------
    def sync(self, writer) -> None:
        """Mirror the staging store after a commit of its root metadata (see the module docstring)."""
        self.flush()  # the commit before: done, or its error raised here
        if self._committer is None:
            self._uploads = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="saepipe-upload")
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saepipe-mirror")
        with self._lock:
            files = self._staging_files()
            changed = [path for path, state in files.items() if self._asked.get(path) != state]
            for path in changed:
                self._asked[path] = files[path]  # a change after this is handed over with a later commit
        root = (self.staging / ROOT_METADATA).read_bytes()  # this commit's, whatever later commits write
        self._in_flight = self._committer.submit(self._commit, changed, root, self._committed_chunks(writer))

    def flush(self) -> None:
        """Wait until the bucket holds the last commit `sync` was given; raises its failure."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        """Stop the background work (a commit in flight ends first); the staging store stays as it is."""
        for pool in (self._committer, self._uploads):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._uploads = self._committer = self._in_flight = None

    def _commit(self, changed: list[str], root: bytes, committed_chunks: list[str]) -> None:
        """One remote commit: the lease confirmed (a writer that lost it must not upload a single chunk),
        the changed files uploaded, the root written, the committed row chunks dropped here."""
        self.lease.confirm()
        for upload in [self._uploads.submit(self._upload, relative) for relative in changed]:
            upload.result()
        self._commit_root(root)
        self._drop(committed_chunks)

    def _upload(self, relative: str) -> None:
        """Upload one file, conditionally: over the object this writer last wrote there (If-Match), or
        where there is none (If-None-Match). A writer whose lease was taken thus never overwrites what the
        new holder wrote; the holder overwrites what a stale writer left, once it has confirmed its lease."""
        local = self.staging / relative
        # the file as it is now: the next commit may have rewritten a row chunk since (rows past the
        # committed ones may hold anything); its state first, so a change after it is uploaded again
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
        with self._lock:
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

    def _commit_root(self, body: bytes) -> None:
        condition = {"IfMatch": self.root_etag} if self.root_etag else {"IfNoneMatch": "*"}
        try:
            response = self._put(posixpath.join(self.remote_root, ROOT_METADATA), body, condition)
        except schema.StoreError:
            raise schema.StoreError(
                f"another collect committed to {self.url} since this one last did (its lease was taken): "
                f"this collect stopped; its committed blocks are in the store, and the other collect carries on"
            ) from None
        self.root_etag = response["ETag"]

    def _committed_chunks(self, writer) -> list[str]:
        """The staging files the collect never writes or reads again once they are in the bucket: the row
        files (chunks, or shards of chunks) wholly below each split's committed rows, and the token files
        (a collect reads its tokens once, into a scratch file of its own, before its first commit; a store
        in S3 never grows). A shard still part-filled stays: the collect writes it whole again, from what
        it holds, when it adds chunks to it."""
        tokens = writer.group[schema.TOKENS]
        found = [
            posixpath.join(schema.TOKENS, tokens.metadata.encode_chunk_key((index, 0)))
            for index in range(-(-tokens.shape[0] // rows_per_file(tokens)))
        ]
        for split in schema.SPLITS:
            for name in schema.row_array_names(writer.header, split):
                arr = writer.group[name]
                full, tail = writer.progress(split).rows_committed // rows_per_file(arr), (0,) * (arr.ndim - 1)
                found += [posixpath.join(name, arr.metadata.encode_chunk_key((index,) + tail)) for index in range(full)]
        return found

    def _drop(self, committed_chunks: list[str]) -> None:
        """Delete the staging copies of `committed_chunks` that are in the bucket."""
        with self._lock:
            for key in committed_chunks:
                if key in self._synced and self._synced[key] != _IN_BUCKET_ONLY:
                    (self.staging / key).unlink(missing_ok=True)
                    self._synced[key] = self._asked[key] = _IN_BUCKET_ONLY
                    self._etags.pop(key, None)

    def _staging_files(self) -> dict[str, tuple[int, int, int]]:
        """Every file of the staging store but its root metadata and Zarr's in-flight temporaries."""
        found = {}
        for folder, _, files in os.walk(self.staging):
            for name in files:
                relative = os.path.relpath(os.path.join(folder, name), self.staging).replace(os.sep, "/")
                if relative != ROOT_METADATA and not name.endswith(".partial"):
                    try:
                        found[relative] = _state(self.staging / relative)
                    except FileNotFoundError:  # a committed chunk dropped (or a file replaced) meanwhile
                        continue
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
        full row files (chunks, or shards of chunks), which the collect will not write again."""
        shutil.rmtree(self.staging, ignore_errors=True)
        file_rows = header.shard_rows or header.chunk_rows  # every row array is sharded alike, or none is
        full = {split: header.rows_committed(split) // file_rows for split in schema.SPLITS}
        skipped = {
            f"{name}/c/": full[split] for split in schema.SPLITS for name in schema.row_array_names(header, split)
        }
        wanted = []
        self.fs.invalidate_cache(self.remote_root)
        for path, info in self.fs.find(self.remote_root, detail=True).items():
            relative = posixpath.relpath(path, self.remote_root)
            prefix = next((p for p in skipped if relative.startswith(p)), None)
            if prefix is not None and int(relative[len(prefix) :].split("/")[0]) < skipped[prefix]:
                self._synced[relative] = self._asked[relative] = _IN_BUCKET_ONLY
                continue
            wanted.append(relative)
            self._etags[relative] = info["ETag"]

        def download(relative: str) -> None:
            local = self.staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(posixpath.join(self.remote_root, relative), str(local))
            if relative != ROOT_METADATA:
                self._synced[relative] = self._asked[relative] = _state(local)

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            list(pool.map(download, wanted))


_IN_BUCKET_ONLY = (-1, -1, -1)  # the _state of a committed full row chunk: deleted here, kept by the bucket


def _state(path: Path) -> tuple[int, int, int]:
    """What tells a rewritten file from the one uploaded: Zarr writes each file anew (temporary + rename),
    so its inode changes even when its size and (coarse) mtime do not."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino
