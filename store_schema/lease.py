"""One writer per store across machines: a lease object beside a store in S3, taken and renewed with
conditional writes.

The lease is the object `.{name}.lease` next to the store `{name}`, holding the writer's id, host, pid
and the lease's duration. It is created with `If-None-Match: *` (only one creator wins), renewed every
third of its duration with `If-Match` on the ETag the holder last wrote (a holder whose lease was taken
fails its renewal, and knows), and taken over once it has gone unrenewed for a whole duration (again
with `If-Match`, so only one of several takers wins). The age of a lease is read from the server's own
clock (the Last-Modified of the object against the Date of the same response), so clocks of the
machines involved never matter.

A lease alone cannot stop a holder that stalled (a paused VM) from writing once more after it expired:
the commit itself is fenced too (RemoteMirror writes the root metadata with If-Match on the ETag it
last wrote), so a store never takes a commit from a writer that lost it."""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import threading
import uuid
from email.utils import parsedate_to_datetime

from store_schema.schema import StoreError

LEASE_SECONDS_VARIABLE = "SAEPIPE_LEASE_SECONDS"  # tests shorten it; 60 s otherwise
DEFAULT_LEASE_SECONDS = 60.0


def lease_key(store_path: str) -> str:
    """`bucket/dir/.x.zarr.lease` for the store `bucket/dir/x.zarr`."""
    parent, name = posixpath.split(store_path.rstrip("/"))
    return posixpath.join(parent, f".{name}.lease")


def is_precondition_failure(e: BaseException) -> bool:
    """Whether an S3 call failed on its If-Match / If-None-Match condition (HTTP 412; 409 for a
    conditional write racing another)."""
    while e is not None:  # s3fs raises its own error from botocore's ClientError
        text = f"{type(e).__name__} {e}"
        if "PreconditionFailed" in text or "ConditionalRequestConflict" in text or "pre-conditions" in text:
            return True
        e = e.__cause__
    return False


def conditional_put(fs, path: str, body: bytes, condition: dict) -> dict | None:
    """PUT `body` at `bucket/key` `path` under `condition` (IfMatch=ETag or IfNoneMatch="*"): S3's
    response, or None when the condition failed (an If-Match on an object deleted since fails too)."""
    bucket, key, _ = fs.split_path(path)
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
    except FileNotFoundError:
        return None
    except Exception as e:
        if is_precondition_failure(e):
            return None
        raise


class ObjectLease:
    """`with ObjectLease(fs, store_path, url):` around everything that writes the store. `fs`: an s3fs
    filesystem; `store_path`: the store's `bucket/key` path; `url`: how messages name the store."""

    def __init__(self, fs, store_path: str, url: str, seconds: float | None = None):
        self.fs, self.key, self.url = fs, lease_key(store_path), url
        self.bucket, self.object, _ = fs.split_path(self.key)
        self.seconds = (
            float(os.environ.get(LEASE_SECONDS_VARIABLE, DEFAULT_LEASE_SECONDS)) if seconds is None else seconds
        )
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "seconds": self.seconds}
        self.etag: str | None = None
        self.lost: str | None = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._renewing = threading.Lock()  # one conditional put at a time: each needs the ETag of the last
        self._renewer: threading.Thread | None = None

    # -- taking and giving back ---------------------------------------------------------------------
    def __enter__(self) -> ObjectLease:
        for _ in range(3):
            if self._put(IfNoneMatch="*"):
                break
            holder, age, etag = self._read()
            if holder is None:  # deleted between our put and our read: try again
                continue
            if age < holder.get("seconds", self.seconds):
                raise StoreError(
                    f"store {self.url} is being written by "
                    f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}), whose lease was renewed "
                    f"{age:.0f} s ago: wait for it to finish, or for its lease to expire "
                    f"({holder.get('seconds', self.seconds):.0f} s unrenewed) if that collect is gone"
                )
            if self._put(IfMatch=etag):
                print(
                    f"saepipe: took over the expired lease s3://{self.key} of {holder.get('host')} "
                    f"(pid {holder.get('pid')})",
                    file=sys.stderr,
                )
                break
        else:
            raise StoreError(f"could not take the lease s3://{self.key}: another collect took it first; try again")
        self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True, name="saepipe-lease")
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        if self.lost is None:
            try:
                _, _, etag = self._read()
                if etag == self.etag:
                    self.fs.rm_file(self.key)
            except Exception:  # noqa: BLE001 - an unremoved lease expires by itself
                pass

    def confirm(self) -> None:
        """Renew the lease now, or raise the one-line StoreError of a lost one: before a writer touches the
        store, so that it writes only while it provably holds the lease, for a whole duration from now."""
        if self.lost is None:
            with self._renewing:
                renewed = self._put(IfMatch=self.etag)
            if not renewed:
                self.lost = self._lost_message()
        if self.lost is not None:
            raise StoreError(self.lost)

    # -- the object ---------------------------------------------------------------------------------
    def _put(self, **condition) -> bool:
        """Write our holder record under `condition`; False when the condition failed."""
        response = conditional_put(self.fs, self.key, json.dumps(self.me).encode(), condition)
        if response is None:
            return False
        self.etag = response["ETag"]
        return True

    def _read(self) -> tuple[dict | None, float, str | None]:
        """The holder record, its age in seconds by the server's clock, and its ETag (None if absent)."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.object)
            data = self.fs.cat_file(self.key)  # for messages only: the ETag and age above are what count
        except FileNotFoundError:
            return None, 0.0, None
        server_now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - head["LastModified"]).total_seconds()
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        return holder, age, head["ETag"]

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                with self._renewing:
                    renewed = self._put(IfMatch=self.etag)
            except Exception:  # noqa: BLE001, S112 - a network error: the next renewal tries again
                continue
            if not renewed:
                self.lost = self._lost_message()
                return

    def _lost_message(self) -> str:
        try:
            holder = self._read()[0] or {}
        except Exception:  # noqa: BLE001 - the message names the taker when it can
            holder = {}
        return (
            f"the lease on {self.url} was taken by {holder.get('host', 'another collect')} (pid "
            f"{holder.get('pid', '?')}) after this collect went {self.seconds:.0f} s without renewing it: this "
            f"collect stopped; its committed blocks are in the store, and the other collect carries on"
        )
