"""One writer per store: collect holds a lock file beside the store while it creates or fills it.

The lock is a file created with O_EXCL (atomic on local filesystems), holding the writer's pid, host
and start time. A second collect refuses with the holder named. A lock left by a killed collect is
stale when its host is this one and its pid is gone; it is then taken over. A lock from another host
cannot be checked from here, so the message says how to remove it by hand.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from store_schema.schema import StoreError

_WRITING_GRACE_S = 5.0  # an unreadable lock younger than this is being written by the collect taking it


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def lock_path(store: str | os.PathLike) -> Path:
    store = Path(store)
    return store.with_name(f".{store.name}.lock")


class StoreLock:
    """`with StoreLock(path):` around everything that writes the store at `path`."""

    def __init__(self, store: str | os.PathLike, kind: str = "store", read_only_fix: str = ""):
        self.store, self.path = Path(store), lock_path(store)
        self.kind = kind  # what the messages call the folder: "store", "run folder"
        self.read_only_fix = read_only_fix or "copy it somewhere writable, or choose a writable --out"
        self.held = False
        self.made: list[Path] = []

    def __enter__(self) -> StoreLock:
        # the folders made here to hold the lock (a sweep's folder): removed again if they stay empty
        self.made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            fd = self._create()
            if fd is not None:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                self.held = True
                return self
            holder = self._holder()
            if holder is None and time.time() - self._mtime() < _WRITING_GRACE_S:
                holder = {"pid": "?", "host": "?", "started": "just now"}  # being written by its taker
            if holder is not None and not self._stale(holder):
                raise StoreError(
                    f"{self.kind} {self.store} is being written by pid {holder['pid']} on "
                    f"{holder['host']} (since {holder['started']}): wait for it to finish; if that "
                    f"process is gone, remove {self.path}"
                )
            print(
                f"saepipe: taking over the stale lock {self.path} of a collect that is gone ({holder or 'unreadable'})",
                file=sys.stderr,
            )
            self.path.unlink(missing_ok=True)
        raise StoreError(f"could not take the lock {self.path}: another collect took it first; try again")

    def _create(self) -> int | None:
        """The new lock file's descriptor; None when a lock is there already."""
        try:
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise StoreError(
                f"cannot write beside {self.kind} {self.store} ({e.strerror}: {self.path}): it is on a "
                f"read-only place; {self.read_only_fix}"
            ) from None

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        for folder in self.made:  # innermost first; one that holds something stays
            try:
                folder.rmdir()
            except OSError:
                break
        self.made = []

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if {"pid", "host", "started"} <= set(holder) else None
        except (OSError, ValueError):
            return None  # half-written by a writer killed while taking it: stale

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @staticmethod
    def _stale(holder: dict) -> bool:
        return (
            holder["host"] == socket.gethostname()
            and str(holder["pid"]).isdigit()
            and not pid_alive(int(holder["pid"]))
        )


def live_holder(store: str | os.PathLike) -> dict | None:
    """Who holds the lock of `store` now ({pid, host, started}), or None: no lock, or a stale one."""
    lock = StoreLock(store)
    holder = lock._holder()
    return holder if holder is not None and not lock._stale(holder) else None
