"""A collect is refused before it starts when the disk under --out cannot hold its activations; the store
it would replace counts as free space."""

import collections
import shutil

import pytest

from stages.basics.errors import SaepipeError
from stages.collect.room import require_disk_room, store_bytes


def test_the_floor_is_the_fp16_activations_with_the_held_out_rows():
    assert store_bytes(1000, [64, 128]) == 1000 * 192 * 2


def test_a_store_that_cannot_fit_is_refused_and_the_one_it_replaces_counts_as_free(tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    out.mkdir()
    (out / "chunk").write_bytes(b"x" * 4000)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 1000))  # 1,000 bytes free
    require_disk_room(out, 1200, 0.0, ["h"], [2])  # 4,800 bytes: 1,000 free + the 4,000 the old store holds
    with pytest.raises(SaepipeError, match=r"--tokens 1,300 \(1,300 rows with the held-out ones\) of 2-wide rows"):
        require_disk_room(out, 1300, 0.0, ["h"], [2])
    with pytest.raises(SaepipeError, match="lower --tokens, or choose an --out on a larger disk"):
        require_disk_room(tmp_path / "new.zarr", 600, 0.5, ["h"], [2])  # 1,200 rows with the eval half
