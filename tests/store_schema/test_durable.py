"""Durable commits: before the root metadata that makes a commit visible replaces the old one, every chunk
file it points to and their folders are flushed; the metadata is flushed before its rename and its
folder after it. Recorded from the system calls themselves (os.fsync, os.replace)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np

from store_schema import schema
from store_schema.generated import write_array_store
from store_schema.header import StoreHeader
from store_schema.writer import StoreWriter


class SyscallLog:
    """Records os.fsync (by the path of the descriptor) and os.replace, and checks every commit."""

    def __init__(self, monkeypatch, store: Path):
        self.flushed: list[Path] = []
        self.events: list[tuple[str, Path]] = []
        self.commits = 0
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            self.flushed.append(path)
            self.events.append(("fsync", path))
            return real_fsync(fd)

        def replace(src, dst):
            if Path(dst) == store / "zarr.json":  # a commit (the store's creation is flushed whole instead)
                self.check_commit(Path(src), Path(dst))
            self.events.append(("replace", Path(dst)))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def check_commit(self, src: Path, dst: Path) -> None:
        """The root metadata about to become visible: what it counts must be on disk already."""
        root = dst.parent
        assert src in self.flushed, "the new root metadata was not flushed before its rename"
        header = json.loads(src.read_text())["attributes"][schema.ATTRS_KEY]
        arrays = json.loads((root / schema.row_context_path("train") / "zarr.json").read_text())
        chunk = arrays["chunk_grid"]["configuration"]["chunk_shape"][0]
        for split in schema.SPLITS:
            rows = header["progress"][split]["rows_committed"]
            for name in schema.row_array_names(StoreHeader.from_attrs(header), split):
                ndim = len(json.loads((root / name / "zarr.json").read_text())["shape"])
                for c in range((rows + chunk - 1) // chunk):
                    path = root / name / "c" / "/".join(map(str, (c,) + (0,) * (ndim - 1)))
                    assert path in self.flushed, f"{path.relative_to(root)} not flushed before the commit"
                    assert path.parent in self.flushed[self.flushed.index(path) :], "its folder not flushed after it"
        self.commits += 1


def test_every_commit_flushes_its_chunks_then_their_folders_then_the_metadata(tmp_path, monkeypatch):
    log = SyscallLog(monkeypatch, tmp_path / "s.zarr")
    rows = np.random.default_rng(0).standard_normal((2500, 8)).astype(np.float32)
    store = write_array_store(tmp_path / "s.zarr", rows[:2000], rows[2000:], hook="h", chunk_rows=512)
    assert log.commits == 4  # the train split, the eval split, complete; the normalization before them
    # after each rename of the root metadata, its folder is flushed next
    renames = [i for i, (kind, path) in enumerate(log.events) if kind == "replace" and path == store / "zarr.json"]
    assert renames and all(log.events[i + 1] == ("fsync", store) for i in renames)
    # the creation: the whole new store is flushed before it is renamed into place, then its parent
    created = log.events.index(("replace", store))
    assert ("fsync", store.parent) == log.events[created + 1]
    assert all(path.is_relative_to(tmp_path) for path in log.flushed)


def test_a_scratch_writer_flushes_nothing(tmp_path, monkeypatch):
    rows = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    store = write_array_store(tmp_path / "s.zarr", rows[:500], rows[500:], hook="h", chunk_rows=256)
    log = SyscallLog(monkeypatch, tmp_path / "elsewhere")
    writer = StoreWriter.open(store, durable=False)
    writer.commit("train", 2, 500, {"h": writer.running_stats("train", "h")}, [])
    assert log.flushed == []
    assert StoreWriter.open(store).header.progress["train"].blocks_done == 2


def test_a_durable_commit_writes_the_bytes_zarr_writes(tmp_path):
    rows = np.random.default_rng(1).standard_normal((700, 8)).astype(np.float32)
    durable = write_array_store(tmp_path / "a.zarr", rows[:600], rows[600:], hook="h", chunk_rows=256)
    scratch = Path(shutil.copytree(durable, tmp_path / "b.zarr"))
    for store in (durable, scratch):
        writer = StoreWriter.open(store, durable=store == durable)
        writer.commit("train", 2, 600, {"h": writer.running_stats("train", "h")}, [3])
    assert (durable / "zarr.json").read_bytes() == (scratch / "zarr.json").read_bytes()
