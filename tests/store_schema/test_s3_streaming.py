"""Streaming from object storage: a store on moto's S3 server behind a proxy that adds 50 ms to every
request (benchmarks/s3_latency.py) streams the batches a local copy streams, bit for bit, with many
chunk requests in flight; a damaged or missing chunk object is refused in one line; `store copy`
streams large files in pieces; and the measurement of docs/scale.md's S3 figures runs end to end on tiny
sizes."""

import time
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from store_schema import copy as store_copy
from store_schema.copy import copy_store
from store_schema.generated import write_array_store
from store_schema.loader import ShuffledBatches
from store_schema.reader import open_store
from store_schema.schema import StoreError
from tests.helpers.s3 import TINY_S3_MEASUREMENT

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from benchmarks.s3_latency import s3_environment, s3_server  # noqa: E402  (needs moto and s3fs)

LATENCY_S = 0.05
CHUNK_ROWS, D = 256, 32


@pytest.fixture(scope="module")
def s3():
    """A bucket URL on a fresh S3 server whose every request takes LATENCY_S longer."""
    import s3fs

    with s3_server(latency_s=LATENCY_S) as endpoint, s3_environment(endpoint):
        bucket = f"stream-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """(local store, its copy on S3, the training rows): 24 chunks of 256 rows of width 32, the last one
    part-filled."""
    rows = np.random.default_rng(7).standard_normal((24 * CHUNK_ROWS - 100, D)).astype(np.float16)
    local = write_array_store(
        tmp_path_factory.mktemp("stream") / "s.zarr", rows, rows[:CHUNK_ROWS], hook="h", chunk_rows=CHUNK_ROWS
    )
    url = f"{s3}/s.zarr"
    copy_store(str(local), url, progress=False)
    return local, url, rows


def _batches(store, start: int, count: int, **kwargs) -> list[torch.Tensor]:
    loader = ShuffledBatches(store, "h", 512, device=torch.device("cpu"), seed=3, resident=False, **kwargs)
    batches = loader.batches(start)
    try:
        return [next(batches).clone() for _ in range(count)]
    finally:
        batches.close()


@pytest.mark.parametrize("start", [0, 7])
def test_streamed_batches_from_s3_equal_local_ones_bit_for_bit(stores, start):
    """Over two epochs (12 batches each), from the first batch and from a resumed one; and the rows
    read_rows gives, through the remote chunk path."""
    local, url, rows = stores
    remote = open_store(url)
    assert remote.streams_chunk_objects("train", "h") and not open_store(local).streams_chunk_objects("train", "h")
    from_s3 = _batches(remote, start, 24, window_chunks=4)
    from_disk = _batches(open_store(local), start, 24, window_chunks=4)
    assert all(torch.equal(a, b) for a, b in zip(from_s3, from_disk))
    np.testing.assert_array_equal(remote.read_rows("train", "h", 300, 5000), rows[300:5000])


def test_a_streamed_training_run_from_s3_equals_the_local_one(stores, tmp_path):
    from stages.train import TrainConfig, run_train

    local, url, _ = stores
    weights = []
    for name, location in (("s3", url), ("local", str(local))):
        cfg = TrainConfig.from_flat(
            store=location,
            out=str(tmp_path / name),
            hook="h",
            width=64,
            k=4,
            tokens=512 * 30,
            batch_size=512,
            resident=False,
            progress=False,
            device="cpu",
        )
        weights.append(load_file(str(run_train(cfg) / "sae.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_chunk_requests_are_in_flight_together(stores):
    """16 chunk objects, each request 50 ms longer: one at a time that is at least 0.8 s; with
    the default concurrency it must take well under half of that."""
    _, url, rows = stores
    one_at_a_time = open_store(url, concurrency=1)
    one_at_a_time.read_chunks("train", "h", [0])  # connections and metadata ready
    started = time.perf_counter()
    one_at_a_time.read_chunks("train", "h", list(range(16)))
    serial_s = time.perf_counter() - started
    assert serial_s >= 16 * LATENCY_S

    store = open_store(url)
    assert store.concurrency >= 16
    store.read_chunks("train", "h", [0])
    started = time.perf_counter()
    got = store.read_chunks("train", "h", list(range(16)))
    parallel_s = time.perf_counter() - started
    np.testing.assert_array_equal(got, rows[: 16 * CHUNK_ROWS])
    assert parallel_s < 8 * LATENCY_S, f"16 chunks took {parallel_s:.3f} s: the requests did not overlap"


def test_the_concurrency_comes_from_the_environment(stores, monkeypatch):
    _, url, _ = stores
    monkeypatch.setenv("SAEPIPE_REMOTE_CONCURRENCY", "5")
    assert open_store(url).concurrency == 5
    monkeypatch.setenv("SAEPIPE_REMOTE_CONCURRENCY", "lots")
    with pytest.raises(StoreError, match=r"^SAEPIPE_REMOTE_CONCURRENCY=lots is not a positive whole number"):
        open_store(url)


@pytest.fixture
def damaged(stores, s3):
    """A fresh S3 copy of the store with chunk 1 of the training rows flipped in one byte, and chunk 3
    deleted."""
    import s3fs

    local, _, _ = stores
    url = f"{s3}/damaged-{uuid.uuid4().hex[:6]}.zarr"
    copy_store(str(local), url, progress=False)
    fs = s3fs.S3FileSystem()
    key = f"{url}/train/acts/h/c/1/0"
    data = bytearray(fs.cat_file(key))
    data[1000] ^= 0x10
    fs.pipe_file(key, bytes(data))
    fs.rm_file(f"{url}/train/acts/h/c/3/0")
    return url


def test_a_damaged_or_missing_chunk_object_is_refused_in_one_line(damaged):
    store = open_store(damaged)
    with pytest.raises(StoreError) as bad:
        store.read_chunks("train", "h", [0, 1])
    assert str(bad.value) == (
        f"chunk 1 of train/acts/h in {damaged} fails its checksum (or is truncated): the store is damaged; "
        f"run `saepipe store verify` to list every damaged part, then copy the store again from its source, "
        f"or collect it again"
    )
    with pytest.raises(StoreError) as missing:
        store.read_rows("train", "h", 3 * CHUNK_ROWS, 3 * CHUNK_ROWS + 10)
    assert str(missing.value) == (
        f"chunk 3 of train/acts/h in {damaged} is missing: the store is damaged; "
        f"run `saepipe store verify` to list every damaged part, then copy the store again from its source, "
        f"or collect it again"
    )
    with pytest.raises(StoreError, match=r"^chunk [13] of train/acts/h in .* the store is damaged"):
        _batches(store, 0, 24, window_chunks=4)  # the streaming loader meets one of them in its first epoch


def test_store_copy_streams_large_files_in_pieces(tmp_path, s3, monkeypatch):
    """Files above PIECE_BYTES (here S3's smallest part, 5 MiB) are copied a piece at a time, to S3 (a
    multipart upload) and back, and arrive whole."""
    monkeypatch.setattr(store_copy, "PIECE_BYTES", 5 << 20)
    rows = np.random.default_rng(1).standard_normal((8192, 1024)).astype(np.float16)
    local = write_array_store(tmp_path / "big.zarr", rows, rows[:16], hook="h", chunk_rows=4096)  # 8 MiB chunks
    streamed = []
    real_stream_file = store_copy._stream_file
    monkeypatch.setattr(
        store_copy,
        "_stream_file",
        lambda src_fs, path, *args: streamed.append(path) or real_stream_file(src_fs, path, *args),
    )
    url = f"{s3}/big-{uuid.uuid4().hex[:6]}.zarr"
    copy_store(str(local), url, progress=False)
    back = tmp_path / "back.zarr"
    copy_store(url, str(back), progress=False)
    assert len(streamed) == 2 * 3  # each way: the two training chunks and the eval chunk
    assert all("/acts/h/c/" in path for path in streamed)
    for path in local.rglob("*"):
        if path.is_file():
            assert (back / path.relative_to(local)).read_bytes() == path.read_bytes(), path


def test_measure_s3_streaming_on_tiny_sizes(tmp_path):
    from benchmarks.scale_s3 import measure_s3_streaming

    result = measure_s3_streaming(tmp_path, latency_s=0.02, progress=False, **TINY_S3_MEASUREMENT)
    assert result["s3_latency_ms"] == pytest.approx(20) and result["s3_concurrency"] >= 1
    for key in ("s3_read_vs_raw_get", "s3_train_vs_local", "s3_collect_vs_raw_put"):
        assert result[key] > 0
    read, train, copied = result["s3_read"], result["s3_train"], result["s3_copy"]
    for figure in (
        read["loader_bytes_per_s_median"],
        read["raw_get_bytes_per_s_median"],
        read["epoch_bytes"],
        read["memory_bound_bytes"],
        train["s3_steps_per_s_median"],
        train["local_steps_per_s_median"],
        copied["bytes"],
        copied["seconds"],
        copied["peak_rss_bytes"],
    ):
        assert figure > 0
    assert list(tmp_path.iterdir()) == []  # its scratch is gone
