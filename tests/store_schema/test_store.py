"""The store contract: normalization, schema checks, writer/reader round trip, commit visibility, loader."""

import itertools
import json

import numpy as np
import pytest
import torch
import zarr

from store_schema import schema
from store_schema.generated import write_array_store
from store_schema.loader import ShuffledBatches
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore, open_store
from store_schema.writer import StoreWriter


def raw_activations(n=2048, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset mean and uneven per-dimension scales, like a residual stream
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 30, d) + 7.0


@pytest.mark.parametrize("mode", ["center-scale", "token", "none"])
def test_normalization_inverts_within_fp16_precision(mode):
    x = raw_activations()
    norm = Normalization.estimate(mode, x[:1024])
    x_hat, row_stats = norm.apply(x)
    stored = torch.from_numpy(x_hat.numpy().astype(np.float16))
    back = norm.invert(stored, row_stats)
    # fp16 keeps 11 significant bits: the round trip may lose ~2^-11 of each row's scale, no more
    err = (back - x).norm(dim=1) / x.norm(dim=1)
    assert err.max() < 2e-3
    if mode != "none":
        assert x_hat.norm(dim=1).mean() == pytest.approx(x.shape[1] ** 0.5, rel=0.05)


def test_center_scale_statistics_are_the_documented_ones():
    x = raw_activations().double()
    norm = Normalization.estimate("center-scale", x.float())
    mean = x.mean(0)
    np.testing.assert_allclose(norm.mean, mean.numpy(), rtol=1e-6, atol=1e-5)
    expected_c = x.shape[1] ** 0.5 / (x - mean).norm(dim=1).mean().item()
    assert norm.scale == pytest.approx(expected_c, rel=1e-6)
    assert norm.mean.dtype == np.float32


def test_round_trip_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    train, evl = rng.standard_normal((5000, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)
    write_array_store(tmp_path / "s.zarr", train, evl, hook="h", chunk_rows=1024)
    store = open_store(tmp_path / "s.zarr")
    assert store.complete and store.hooks == ["h"] and store.d_model == 16
    assert store.n_rows("train") == 5000 and store.n_rows("eval") == 300
    np.testing.assert_array_equal(store.read_rows("train", "h"), train.astype(np.float16))
    np.testing.assert_array_equal(store.read_rows("eval", "h", 17, 250), evl[17:250].astype(np.float16))
    stats = store.running_stats("train", "h")
    np.testing.assert_allclose(stats.mean, train.astype(np.float16).astype(np.float64).mean(0), rtol=1e-9)
    # a teammate with plain zarr reads the same bytes
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group.attrs["saepipe"]["schema_version"] == 2  # every hook d_model wide: version 2, which older readers read
    np.testing.assert_array_equal(group["train/acts/h"][:10], train[:10].astype(np.float16))


def test_raw_chunk_reads_equal_zarr_reads(tmp_path, monkeypatch):
    """The direct chunk-file path returns exactly what Zarr decodes: any row range, chunks in any order,
    a chunk of only the fill value (written all the same, so a missing file means damage), and it is
    not taken for a compressed array."""
    from store_schema import reader

    rng = np.random.default_rng(1)
    train = rng.standard_normal((5000, 16)).astype(np.float32)
    train[2048:3072] = 0  # chunk 2 holds only the fill value
    write_array_store(tmp_path / "s.zarr", train, train[:300], hook="h", chunk_rows=1024)
    store = open_store(tmp_path / "s.zarr")
    assert reader._raw_chunk_files(store.acts("train", "h")) is not None
    assert (tmp_path / "s.zarr" / "train" / "acts" / "h" / "c" / "2" / "0").exists()
    expected = train.astype(np.float16)
    for start, stop in [(0, 5000), (17, 1030), (1024, 2048), (2000, 4999), (4096, 5000)]:
        np.testing.assert_array_equal(store.read_rows("train", "h", start, stop), expected[start:stop])
    np.testing.assert_array_equal(
        store.read_chunks("train", "h", [4, 0, 2]),
        np.concatenate([expected[4096:], expected[:1024], expected[2048:3072]]),
    )

    compressed = zarr.create_array(str(tmp_path / "z.zarr"), shape=(10, 4), chunks=(5, 4), dtype="float16")
    assert reader._raw_chunk_files(compressed) is None  # zstd by default: Zarr must decode it
    monkeypatch.setattr(reader, "_raw_chunk_files", lambda arr: None)
    store = open_store(tmp_path / "s.zarr")  # a store chooses how to read each array once, when first read
    np.testing.assert_array_equal(
        store.read_chunks("train", "h", [4, 0]), np.concatenate([expected[4096:], expected[:1024]])
    )


@pytest.mark.parametrize("raw_path", [True, False])
def test_a_flipped_byte_or_a_missing_chunk_is_caught_and_named(tmp_path, monkeypatch, raw_path):
    """Every chunk carries a CRC32C (Zarr's crc32c codec): a flipped byte anywhere in a chunk, even in rows
    not asked for, fails the read with the chunk named, through our direct reader and through Zarr."""
    from store_schema import reader

    rng = np.random.default_rng(3)
    train = rng.standard_normal((3000, 8)).astype(np.float32)
    write_array_store(tmp_path / "s.zarr", train, train[:10], hook="h", chunk_rows=1024)
    if not raw_path:
        monkeypatch.setattr(reader, "_raw_chunk_files", lambda arr: None)
    chunk_file = tmp_path / "s.zarr" / "train" / "acts" / "h" / "c" / "1" / "0"
    good = chunk_file.read_bytes()
    damaged = bytearray(good)
    damaged[5000] ^= 0x10
    chunk_file.write_bytes(bytes(damaged))
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.read_rows("train", "h", 0, 1024), train[:1024].astype(np.float16))
    with pytest.raises(schema.StoreError, match=r"chunk 1 of train/acts/h in .* fails its checksum"):
        store.read_rows("train", "h", 1100, 1200)  # the flipped byte is in row ~1028, not in these rows
    chunk_file.unlink()  # Zarr alone would read a missing chunk as zeros
    with pytest.raises(schema.StoreError, match="chunk 1 of train/acts/h in .* is missing"):
        store.read_rows("train", "h", 1100, 1200)


def test_uncommitted_rows_are_invisible(tmp_path):
    rng = np.random.default_rng(0)
    write_array_store(tmp_path / "s.zarr", rng.standard_normal((100, 8)), rng.standard_normal((10, 8)), hook="h")
    writer = StoreWriter.open(tmp_path / "s.zarr")
    writer.commit("train", 1, 60, {"h": writer.running_stats("train", "h")}, [])
    writer._update(complete=False)
    store = open_store(tmp_path / "s.zarr")
    assert store.n_rows("train") == 60
    assert len(store.read_rows("train", "h")) == 60
    with pytest.raises(schema.StoreError, match="incomplete"):
        store.require_complete()


def test_open_refuses_what_is_not_a_readable_store(tmp_path):
    with pytest.raises(schema.StoreError, match="no store at"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    with pytest.raises(schema.StoreError, match="not a Zarr group"):
        open_store(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(schema.StoreError, match="not a saepipe activation store"):
        open_store(tmp_path / "other.zarr")
    rng = np.random.default_rng(0)
    write_array_store(tmp_path / "new.zarr", rng.standard_normal((10, 4)), rng.standard_normal((2, 4)), hook="h")
    meta = tmp_path / "new.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["saepipe"]["schema_version"] = schema.SCHEMA_VERSION + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(schema.StoreError, match="newer than this saepipe reads"):
        open_store(tmp_path / "new.zarr")


def test_missing_hook_is_named(tmp_path):
    rng = np.random.default_rng(0)
    write_array_store(tmp_path / "s.zarr", rng.standard_normal((10, 4)), rng.standard_normal((2, 4)), hook="h")
    with pytest.raises(schema.StoreError, match="hook 'blocks.3.hook_resid_post' is not in store .* holds: h"):
        open_store(tmp_path / "s.zarr").require_hook("blocks.3.hook_resid_post")


@pytest.mark.parametrize("resident", [True, False])
def test_loader_epoch_is_a_permutation_and_resumable(tmp_path, resident):
    n, d, batch = 2048, 4, 128
    # row i holds the value i in its first column, so batches tell which rows they hold
    train = np.zeros((n, d), np.float32)
    train[:, 0] = np.arange(n)
    write_array_store(tmp_path / "s.zarr", train, train[:8], hook="h", chunk_rows=512)
    store = ActivationStore.open(tmp_path / "s.zarr")
    loader = ShuffledBatches(store, "h", batch, device=torch.device("cpu"), seed=3, resident=resident, window_chunks=2)
    assert loader.batches_per_epoch == n // batch
    it = loader.batches()
    seen = [next(it) for _ in range(loader.batches_per_epoch + 3)]
    ids = torch.cat([b[:, 0] for b in seen[: loader.batches_per_epoch]]).long()
    assert sorted(ids.tolist()) == list(range(n))  # fp16 holds integers up to 2048 exactly
    assert not torch.equal(ids, torch.arange(n))  # shuffled
    # batch i depends only on (seed, i): starting at 5 continues the same sequence
    restarted = loader.batches(5)
    for i in range(5, len(seen)):
        assert torch.equal(next(restarted), seen[i])
    # the next epoch is a different order
    assert not torch.equal(seen[loader.batches_per_epoch], seen[0])


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("world_size,batch", [(2, 128), (4, 128), (3, 120)])
def test_ranks_split_every_global_batch_into_disjoint_shares(tmp_path, resident, world_size, batch):
    """Data parallelism: rank r's batch i is rows [r·B/N, (r+1)·B/N) of the single-process batch i, so
    the ranks together see exactly what one process sees (3 ranks: runs of 7 rows straddle shares)."""
    n = 2048
    train = np.zeros((n, 4), np.float32)
    train[:, 0] = np.arange(n)
    write_array_store(tmp_path / "s.zarr", train, train[:8], hook="h", chunk_rows=512)
    store = ActivationStore.open(tmp_path / "s.zarr")

    rows_read = []
    read_into = store.read_into
    store.read_into = lambda split, hook, pieces, *args, **kw: (
        rows_read.append(sum(len(p[1]) for p in pieces)),
        read_into(split, hook, pieces, *args, **kw),
    )

    def first_batches(rank, size, count=20, start=0):
        rows_read.clear()
        loader = ShuffledBatches(
            store,
            "h",
            batch,
            device=torch.device("cpu"),
            seed=3,
            resident=resident,
            window_chunks=2,
            rank=rank,
            world_size=size,
        )
        it = loader.batches(start)
        batches = [next(it).clone() for _ in range(count)]
        it.close()
        return batches, rows_read[0] if rows_read else None

    whole, whole_read = first_batches(0, 1)
    shares = []
    for rank in range(world_size):
        share, share_read = first_batches(rank, world_size)
        shares.append(share)
        if not resident:  # a streaming rank reads about its share of a window, not the whole window
            assert share_read <= 1.25 * whole_read / world_size  # runs straddling two shares are read twice
    for i, expected in enumerate(whole):
        assert torch.equal(torch.cat([share[i] for share in shares]), expected)
    # a resumed rank continues its own sequence
    assert all(torch.equal(a, b) for a, b in zip(first_batches(1, world_size, 5, start=7)[0], shares[1][7:12]))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        ShuffledBatches(store, "h", batch, device=torch.device("cpu"), rank=0, world_size=batch + 1)


def test_streamed_fp16_batches_are_views_that_stay_valid_when_kept(tmp_path, monkeypatch):
    """On the CPU in fp16 a streamed batch is a slice of the loader's window buffer. A buffer is recycled
    once the consumer has moved on (no new allocation per window in a plain loop), and never while a
    kept batch still refers to it."""
    n, d, batch = 2048, 4, 64
    train = np.zeros((n, d), np.float32)
    train[:, 0] = np.arange(n)  # fp16 holds integers up to 2048 exactly
    write_array_store(tmp_path / "s.zarr", train, train[:8], hook="h", chunk_rows=128)
    store = ActivationStore.open(tmp_path / "s.zarr")
    allocations = []
    original = ShuffledBatches._window_buffer
    monkeypatch.setattr(ShuffledBatches, "_window_buffer", lambda self: allocations.append(1) or original(self))
    loader = ShuffledBatches(
        store, "h", batch, device=torch.device("cpu"), dtype=torch.float16, seed=1, resident=False, window_chunks=2
    )
    per_epoch = loader.batches_per_epoch  # 8 windows of 4 batches
    it = loader.batches()
    for _ in range(3 * per_epoch):
        batch_rows = next(it)
    it.close()
    assert len(allocations) == ShuffledBatches.WINDOW_BUFFERS  # recycled: 24 windows served from 4 buffers
    del batch_rows

    kept = list(itertools.islice(loader.batches(), 3 * per_epoch))
    assert kept[0]._base is not None  # a view, not a copy
    copies = ShuffledBatches(
        store, "h", batch, device=torch.device("cpu"), dtype=torch.float32, seed=1, resident=False, window_chunks=2
    )
    for got, want in zip(kept, itertools.islice(copies.batches(), 3 * per_epoch)):
        assert torch.equal(got.float(), want)  # no kept batch was overwritten by a later window
    for epoch in range(3):
        ids = torch.cat(kept[epoch * per_epoch : (epoch + 1) * per_epoch])[:, 0].long()
        assert sorted(ids.tolist()) == list(range(n))


def test_read_into_scatters_rows_to_any_destinations(tmp_path, monkeypatch):
    from store_schema import reader

    rng = np.random.default_rng(2)
    train = rng.standard_normal((3000, 8)).astype(np.float32)
    write_array_store(tmp_path / "s.zarr", train, train[:10], hook="h", chunk_rows=1024)
    store = open_store(tmp_path / "s.zarr")
    expected = train.astype(np.float16)
    # pieces out of order, adjacent and not, across chunks, into slots of one buffer in a shuffled order
    firsts = [2048 + 900, 0, 10, 1024, 100, 1000, 2048]
    lengths = [52, 10, 90, 512, 7, 24, 300]
    for raw in (True, False):
        if not raw:
            monkeypatch.setattr(reader, "_raw_chunk_files", lambda arr: None)
            store = open_store(tmp_path / "s.zarr")  # chosen once per array, when first read
        out = np.zeros((sum(lengths), 8), np.float16)
        pieces, slot = [], 0
        for i in [3, 0, 6, 1, 5, 2, 4]:
            pieces.append((firsts[i], out[slot : slot + lengths[i]]))
            slot += lengths[i]
        store.read_into("train", "h", pieces, threads=2)
        for first, dest in pieces:
            np.testing.assert_array_equal(dest, expected[first : first + len(dest)])
    with pytest.raises(ValueError, match="within one chunk"):
        store.read_into("train", "h", [(1000, np.zeros((48, 8), np.float16))])
    with pytest.raises(ValueError, match="not committed"):
        store.read_into("train", "h", [(2990, np.zeros((20, 8), np.float16))])


def test_a_truncated_chunk_file_is_named(tmp_path):
    train = np.ones((2048, 8), np.float32)
    write_array_store(tmp_path / "s.zarr", train, train[:10], hook="h", chunk_rows=1024)
    path = tmp_path / "s.zarr" / "train" / "acts" / "h" / "c" / "1" / "0"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(schema.StoreError, match=r"chunk 1 of train/acts/h in .* \(or is truncated\)"):
        open_store(tmp_path / "s.zarr").read_rows("train", "h")


def test_split_assignment_and_budget():
    n_ctx = schema.contexts_needed(10_000, 127, 0.1)
    n_train, n_eval = schema.split_counts(n_ctx, 0.1)
    assert n_train * 127 >= 10_000 and n_eval >= 1
    split = schema.assign_split(n_ctx, 0.1, seed=0)
    assert (split == 1).sum() == n_eval and np.array_equal(split, schema.assign_split(n_ctx, 0.1, seed=0))


def test_outlier_rows_do_not_shape_the_statistics():
    x = raw_activations()
    polluted = x.clone()
    polluted[::100] *= 200.0  # 1% massive-activation rows
    clean = Normalization.estimate("center-scale", x, outlier_factor=10.0)
    robust = Normalization.estimate("center-scale", polluted, outlier_factor=10.0)
    assert robust.inliers(polluted).sum() == len(x) - len(x[::100])
    assert robust.scale == pytest.approx(clean.scale, rel=0.05)
    naive = Normalization.estimate("center-scale", polluted)
    assert naive.scale < 0.5 * clean.scale and naive.max_norm is None
