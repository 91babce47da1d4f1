"""Sharded row arrays (Zarr v3 shards of the raw layout, their index at the end): the reader finds each
chunk in its shard, locally and in an object store, and gives exactly the rows of the same store
unsharded; a damaged row, a damaged index, a shard that does not hold a chunk and a missing shard are
refused in one line naming the chunk; `store verify` names each; a mirror to S3 keeps a shard still
being filled in its staging store."""

import dataclasses
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import zarr

from store_schema import reader, schema, shards
from store_schema.copy import copy_store
from store_schema.generated import write_array_store
from store_schema.mirror import RemoteMirror
from store_schema.reader import open_store
from store_schema.verify import verify_store
from tests.helpers.http import served_over_http
from tests.helpers.s3 import moto_bucket

CHUNK_ROWS, SHARD_CHUNKS, D = 64, 4, 16
SHARD_ROWS = CHUNK_ROWS * SHARD_CHUNKS
# train: 3 whole shards, then a shard of 2 whole chunks and a part-filled one; eval: less than 2 shards,
# its rows not a multiple of the shard, nor of the chunk
N_TRAIN, N_EVAL = 3 * SHARD_ROWS + 2 * CHUNK_ROWS + 17, SHARD_ROWS + 44
ACTS = schema.acts_path("train", "h")


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(11)
    return {
        "train": rng.standard_normal((N_TRAIN, D)).astype(np.float16),
        "eval": rng.standard_normal((N_EVAL, D)).astype(np.float16),
    }


@pytest.fixture(scope="module")
def stores(rows, tmp_path_factory):
    """(the store unsharded, the same store with its row arrays of activations sharded)."""
    folder = tmp_path_factory.mktemp("sharded")
    plain = write_array_store(folder / "plain.zarr", rows["train"], rows["eval"], hook="h", chunk_rows=CHUNK_ROWS)
    sharded = folder / "sharded.zarr"
    shutil.copytree(plain, sharded)
    _shard_acts(sharded)
    return plain, sharded


def _shard_acts(path: Path) -> None:
    """Rewrite the store's arrays of activations with plain Zarr, the same rows in shards of SHARD_CHUNKS
    chunks (raw layout, index at the end, as saepipe writes them)."""
    group = zarr.open_group(str(path), mode="r+")
    for split in schema.SPLITS:
        old = group[schema.acts_path(split, "h")]
        data = old[...]
        new = group.create_array(
            schema.acts_path(split, "h"),
            shape=old.shape,
            dtype=old.dtype,
            chunks=old.chunks,
            shards=(SHARD_ROWS, old.shape[1]),
            compressors=schema.checksummed(),
            fill_value=old.fill_value,
            overwrite=True,
        )
        with zarr.config.set(schema.EVERY_CHUNK_WRITTEN_CONFIG):
            new[...] = data


@pytest.fixture
def damaged_copy(stores, tmp_path):
    """A copy of the sharded store to damage."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(stores[1], copy)
    return copy


def _shard_file(store: Path, shard: int, split: str = "train") -> Path:
    return store / schema.acts_path(split, "h") / "c" / str(shard) / "0"


def _entries(path: Path) -> np.ndarray:
    data = path.read_bytes()
    return shards.decode_index(data[-shards.index_bytes(SHARD_CHUNKS) :], SHARD_CHUNKS).copy()


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_row_byte(store: Path, chunk: int) -> None:
    """Flip a byte of a row of `chunk` (train), where its shard's index puts it."""
    path = _shard_file(store, chunk // SHARD_CHUNKS)
    _flip(path, int(_entries(path)[chunk % SHARD_CHUNKS][0]) + 3 * D * 2 + 5)


def _rewrite_index(path: Path, entries: np.ndarray) -> None:
    """Replace a shard's index by `entries`, checksummed anew (an index that is whole, but wrong)."""
    data = path.read_bytes()[: -shards.index_bytes(SHARD_CHUNKS)]
    path.write_bytes(data + b"".join(shards.encode_index(entries)))


def _no_zarr(monkeypatch) -> None:
    """Any read of rows through Zarr's codec pipeline fails: the sharded rows must be read directly."""

    def refuse(*args):
        raise AssertionError("a sharded chunk of the raw layout was read through Zarr")

    monkeypatch.setattr(reader._Chunks, "through_zarr", refuse)


def _reads(store, split: str) -> list[np.ndarray]:
    """Every way of reading rows, the same rows asked for in several shapes; twice, so that the reads
    after the chunks' checksums were checked (straight into the destinations) are compared too."""
    n = store.n_rows(split)
    last = (n - 1) // CHUNK_ROWS
    chunks = list(dict.fromkeys([last, 0, min(5, last), 3, last - 1, 1]))  # distinct: pieces must not overlap
    out = []
    for _ in range(2):
        out.append(store.read_rows(split, "h"))
        for start, stop in [(0, 1), (17, SHARD_ROWS + 3), (SHARD_ROWS - 5, 2 * SHARD_ROWS + 70), (n - 90, n)]:
            out.append(store.read_rows(split, "h", start, stop, threads=3))
        out.append(store.read_chunks(split, "h", chunks, threads=2))
        pieces = [(c * CHUNK_ROWS + 7, np.empty((20, D), np.float16)) for c in chunks if c < last]
        pieces += [(c * CHUNK_ROWS + 40, np.empty((9, D), np.float16)) for c in chunks if c < last]
        store.read_into(split, "h", pieces, threads=2)
        out += [dest for _, dest in pieces]
        out += [rows for _, rows in store.stream_chunks(split, "h", chunks)]
    return out


def _same_reads(store, plain, rows) -> None:
    for split in schema.SPLITS:
        got, expected = _reads(store, split), _reads(plain, split)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got[0], rows[split])


def test_sharded_rows_read_as_the_unsharded_ones(stores, rows, monkeypatch):
    plain, sharded = stores
    arr = zarr.open_group(str(sharded), mode="r")[ACTS]
    assert arr.shards == (SHARD_ROWS, D) and reader.raw_layout(arr)
    assert sorted(p.name for p in (sharded / ACTS / "c").iterdir()) == ["0", "1", "2", "3"]
    plain_store = open_store(plain)
    store = open_store(sharded)
    _no_zarr(monkeypatch)
    _same_reads(store, plain_store, rows)
    # the indexes of whole committed shards are kept; that of the part-filled last one is read each time
    assert set(store._source("train", "h")._indexes) == {0, 1, 2}
    assert set(store._source("eval", "h")._indexes) == {0}


def test_only_whole_committed_shards_keep_their_index(stores, rows):
    """A shard still being filled is replaced as it fills: its index is read anew for each chunk."""
    arr = zarr.open_group(str(stores[1]), mode="r")[ACTS]
    n_rows = SHARD_ROWS + 2 * CHUNK_ROWS + 5  # shard 1 part-committed
    files = reader._ChunkFiles(arr, n_rows, "chunk {}")
    dest = np.empty((n_rows, D), np.float16)
    files.fill({c: [(c * CHUNK_ROWS, dest[c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS])] for c in range(7)}, threads=2)
    np.testing.assert_array_equal(dest, rows["train"][:n_rows])
    assert set(files._indexes) == {0}


def _train_chunks(rows, chunks: list[int]) -> np.ndarray:
    return np.concatenate([rows["train"][c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS] for c in chunks])


def test_a_flipped_row_byte_a_flipped_index_byte_and_a_missing_shard_name_the_chunk(damaged_copy, rows):
    _flip_row_byte(damaged_copy, 5)
    _flip(_shard_file(damaged_copy, 2), _shard_file(damaged_copy, 2).stat().st_size - 7)
    _shard_file(damaged_copy, 3).unlink()
    store = open_store(damaged_copy)
    # the other chunks of a shard with one damaged chunk read as ever
    np.testing.assert_array_equal(store.read_chunks("train", "h", [4, 6, 7]), _train_chunks(rows, [4, 6, 7]))
    with pytest.raises(schema.StoreError, match=rf"^chunk 5 of {ACTS} in .* fails its checksum .*damaged"):
        store.read_rows("train", "h", 5 * CHUNK_ROWS + 1, 5 * CHUNK_ROWS + 2)
    with pytest.raises(schema.StoreError, match=rf"^chunk 9 of {ACTS} in .*its shard's index fails its checksum"):
        store.read_chunks("train", "h", [9])
    with pytest.raises(schema.StoreError, match=rf"^chunk 12 of {ACTS} in .* is missing: the store is damaged"):
        list(store.stream_chunks("train", "h", [12, 13]))


def test_an_index_without_the_chunk_or_with_a_wrong_length_is_damage(damaged_copy):
    path = _shard_file(damaged_copy, 1)
    entries = _entries(path)
    entries[2] = shards.ABSENT
    entries[3][1] += 4
    _rewrite_index(path, entries)
    store = open_store(damaged_copy)
    with pytest.raises(schema.StoreError, match=rf"^chunk 6 of {ACTS} in .* is missing"):
        store.read_chunks("train", "h", [6])
    with pytest.raises(
        schema.StoreError, match=rf"^chunk 7 of {ACTS} in .* is 2,056 bytes by its shard's index, not 2,052"
    ):
        store.read_chunks("train", "h", [7])
    assert store.read_chunks("train", "h", [4, 5]).shape == (2 * CHUNK_ROWS, D)


def test_a_chunk_its_shard_does_not_hold_reads_as_zeros_without_checksums(stores, rows, tmp_path, monkeypatch):
    """Zarr leaves a chunk of only the fill value out of its shard (write_empty_chunks off): an array
    without checksums (an older store's) reads it as the fill value, as Zarr does."""
    path = tmp_path / "s.zarr"
    shutil.copytree(stores[0], path)
    expected = rows["train"].copy()
    expected[CHUNK_ROWS : 2 * CHUNK_ROWS] = 0
    arr = zarr.open_group(str(path), mode="r+").create_array(
        ACTS,
        shape=expected.shape,
        dtype="float16",
        chunks=(CHUNK_ROWS, D),
        shards=(SHARD_ROWS, D),
        compressors=None,
        fill_value=0,
        overwrite=True,
    )
    arr[...] = expected
    assert _entries(_shard_file(path, 0))[1][0] == shards.ABSENT and reader.raw_layout(arr)
    _no_zarr(monkeypatch)
    store = open_store(path)
    np.testing.assert_array_equal(store.read_rows("train", "h"), expected)
    np.testing.assert_array_equal(store.read_chunks("train", "h", [1, 2]), expected[CHUNK_ROWS : 3 * CHUNK_ROWS])


def test_verify_names_every_damaged_chunk_of_a_sharded_store(stores, damaged_copy):
    assert verify_store(open_store(stores[1]), progress=False).damaged == []
    assert verify_store(open_store(stores[1]), progress=False).foreign == []
    _flip_row_byte(damaged_copy, 5)
    _flip(_shard_file(damaged_copy, 2), _shard_file(damaged_copy, 2).stat().st_size - 7)
    _shard_file(damaged_copy, 3).unlink()
    path = _shard_file(damaged_copy, 0)
    entries = _entries(path)
    entries[1] = shards.ABSENT
    _rewrite_index(path, entries)
    stray = damaged_copy / ACTS / "c" / "5" / "0"  # inside the grid of chunks, outside that of shards
    stray.parent.mkdir()
    stray.write_bytes(b"x")
    result = verify_store(open_store(damaged_copy), progress=False)
    assert result.damaged == [
        f"chunk 1 of {ACTS} is missing",
        f"chunk 5 of {ACTS} fails its checksum",
        *(f"chunk {c} of {ACTS} fails its checksum" for c in range(8, 12)),
        *(f"chunk {c} of {ACTS} is missing" for c in range(12, 15)),
    ]
    assert result.foreign == [f"{ACTS}/c/5/0"]


@pytest.fixture(scope="module")
def bucket():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with moto_bucket() as (url, _):
        yield url


def test_sharded_rows_read_from_s3_and_damage_is_named(stores, rows, bucket, monkeypatch):
    import s3fs

    plain, sharded = stores
    url = f"{bucket}/sharded.zarr"
    copy_store(str(sharded), url, progress=False)
    store = open_store(url)
    assert store.streams_chunk_objects("train", "h")
    _no_zarr(monkeypatch)
    _same_reads(store, open_store(plain), rows)
    assert set(store._source("train", "h")._indexes) == {0, 1, 2}
    assert verify_store(store, progress=False).damaged == []

    fs = s3fs.S3FileSystem()
    key = f"{url.removeprefix('s3://')}/{ACTS}/c"
    shard = bytearray(fs.cat_file(f"{key}/1/0"))
    shard[int(shards.decode_index(bytes(shard[-shards.index_bytes(SHARD_CHUNKS) :]), SHARD_CHUNKS)[1][0]) + 9] ^= 1
    fs.pipe_file(f"{key}/1/0", bytes(shard))
    index_damaged = bytearray(fs.cat_file(f"{key}/3/0"))
    index_damaged[-3] ^= 1
    fs.pipe_file(f"{key}/3/0", bytes(index_damaged))
    fs.rm_file(f"{key}/2/0")
    fresh = open_store(url)
    with pytest.raises(schema.StoreError, match=rf"^chunk 5 of {ACTS} in {url} fails its checksum"):
        fresh.read_chunks("train", "h", [4, 5])
    with pytest.raises(schema.StoreError, match=rf"^chunk 14 of {ACTS} in {url} cannot be found: its shard's index"):
        fresh.read_rows("train", "h", N_TRAIN - 3)
    with pytest.raises(schema.StoreError, match=rf"^chunk 9 of {ACTS} in {url} is missing"):
        list(fresh.stream_chunks("train", "h", [9]))
    np.testing.assert_array_equal(fresh.read_chunks("train", "h", [4, 0, 6]), _train_chunks(rows, [4, 0, 6]))
    assert verify_store(fresh, progress=False).damaged == [
        f"chunk 5 of {ACTS} fails its checksum",
        *(f"chunk {c} of {ACTS} is missing" for c in range(8, 12)),
        *(f"chunk {c} of {ACTS} fails its checksum" for c in range(12, 15)),
    ]


@pytest.fixture(scope="module")
def http_root(stores):
    """The stores' folder, served read-only by Python's http.server (which ignores Range headers)."""
    pytest.importorskip("aiohttp")
    with served_over_http(stores[1].parent) as url:
        yield url


def test_sharded_rows_read_over_http_from_a_server_that_ignores_ranges(stores, rows, http_root, monkeypatch):
    plain, sharded = stores
    store = open_store(f"{http_root}/{sharded.name}")
    _no_zarr(monkeypatch)
    _same_reads(store, open_store(plain), rows)


def test_a_mirror_keeps_a_part_filled_shard_in_staging(stores, bucket, tmp_path):
    """The staging files a mirror drops once in the bucket are the whole committed shards; a resumed
    collect's staging store holds every other file, the part-filled shards among them."""
    import s3fs

    sharded = stores[1]
    group = zarr.open_group(str(sharded), mode="r")
    store = open_store(sharded)
    committed = {"train": 2 * SHARD_ROWS + CHUNK_ROWS + 3, "eval": N_EVAL}
    writer = types.SimpleNamespace(
        group=group,
        header=store.header,
        progress=lambda split: types.SimpleNamespace(rows_committed=committed[split]),
    )
    dropped = {key for key in RemoteMirror._committed_chunks(None, writer) if key.startswith(ACTS)}
    assert dropped == {f"{ACTS}/c/0/0", f"{ACTS}/c/1/0"}

    url = f"{bucket}/mirrored.zarr"
    copy_store(str(sharded), url, progress=False)
    fs = s3fs.S3FileSystem()
    mirror = RemoteMirror(fs, url.removeprefix("s3://"), url, tmp_path / "staging", lease=None)
    header = dataclasses.replace(store.header, shard_rows=SHARD_ROWS)
    mirror.rebuild(header)
    staged = tmp_path / "staging" / ACTS / "c"
    assert sorted(p.name for p in staged.iterdir()) == ["3"]  # the train shards 0-2 are whole and committed
    eval_staged = tmp_path / "staging" / schema.acts_path("eval", "h") / "c"
    assert sorted(p.name for p in eval_staged.iterdir()) == ["1"]
