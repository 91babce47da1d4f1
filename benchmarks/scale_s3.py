"""Streaming from object storage at speed, measured against moto's S3 server on
loopback behind a proxy that adds a fixed latency to every request (benchmarks/s3_latency.py).

A Python test server on 2 cores is far slower than a local disk, so both figures are ratios to what
the same server gives:
- s3_read_vs_raw_get: the streaming loader reading the whole train split once from s3:// (bytes/s),
  over plain parallel GETs of the same chunk objects with the same concurrency (what any client could
  pull from that server);
- s3_train_vs_local: TopK training steps/s from s3:// over the same training from the local store, both
  streaming, at a width whose data rate is a sizable share of what the server delivers.
Beside them: the loader's peak RSS growth while streaming, and `store copy` from s3:// to a local folder
(wall time, peak RSS growth). Run: `python -m benchmarks.scale_s3` (prints the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec.asyn
import numpy as np
import psutil
import torch

from benchmarks.bench import fresh_training_run
from benchmarks.child import peak_rss_bytes, rss_bytes, run_in_child
from benchmarks.s3_collect import measure_s3_collect
from benchmarks.s3_latency import s3_environment, s3_server
from stages.collect.config import DEFAULT_SHARD_CHUNKS
from stages.train.config import TrainConfig
from store_schema import shards
from store_schema.copy import copy_store
from store_schema.generated import write_array_store
from store_schema.loader import ShuffledBatches
from store_schema.reader import REMOTE_CONCURRENCY, open_store, storage_options

HOOK = "scale"
COPY_THREADS = inspect.signature(copy_store).parameters["threads"].default  # `store copy`'s default


def measure_s3_streaming(
    scratch_dir: Path,
    *,
    latency_s: float = 0.03,
    concurrency: int = REMOTE_CONCURRENCY,
    d_model: int = 512,
    chunk_rows: int = 2048,
    n_chunks: int = 160,
    batch_size: int = 4096,
    width: int = 1024,
    k: int = 32,
    train_steps: int = 50,
    rounds: int = 4,
    collect_tokens: int = 524_288,
    collect_width: int = 576,
    progress: bool = True,
) -> dict:
    """The figures above, as a dict for runs/scale/scale.json. The store has n_chunks chunk objects of
    chunk_rows x d_model fp16 rows (160 x 2 MiB by default); each side of a ratio runs `rounds` times,
    alternating, and each side's figure is the median. Scratch files and servers are gone on return."""
    say = _progress(progress)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scale-s3-", dir=scratch_dir))
    try:
        local = scratch / "local.zarr"
        say(f"writing a {n_chunks * chunk_rows * d_model * 2 / 1e6:.0f} MB store of {n_chunks} chunks")
        _write_store(local, n_chunks * chunk_rows, d_model, chunk_rows)
        with s3_server(latency_s) as endpoint, s3_environment(endpoint):
            import s3fs

            bucket = f"saepipe-scale-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem().mkdir(bucket)
            url = f"s3://{bucket}/store.zarr"
            say(f"uploading it to {url} (latency {latency_s * 1000:.0f} ms per request)")
            started = time.perf_counter()
            copy_store(str(local), url, progress=False)
            upload_s = time.perf_counter() - started
            result = {
                "s3_latency_ms": latency_s * 1000,
                "s3_concurrency": concurrency,
                "s3_store": {
                    "chunks": n_chunks,
                    "chunk_rows": chunk_rows,
                    "d_model": d_model,
                    "chunk_object_bytes": chunk_rows * d_model * 2 + 4,
                    "train_bytes": n_chunks * chunk_rows * d_model * 2,
                    "upload_s": upload_s,
                },
            }
            say("reading: the streaming loader against plain parallel GETs")
            result |= _measure_read(url, concurrency, batch_size, rounds)
            say("training from s3:// and from the local store")
            result |= _measure_train(url, local, scratch, concurrency, batch_size, width, k, train_steps, rounds)
            say("store copy s3:// -> local")
            result |= _measure_copy(url, scratch / "copied.zarr")
            say("collect straight to s3:// against plain parallel PUTs of its files")
            result |= measure_s3_collect(bucket, scratch, collect_tokens, collect_width, rounds, _rounds)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _progress(enabled: bool) -> Callable[[str], None]:
    started = time.perf_counter()

    def say(line: str) -> None:
        if enabled:
            print(f"scale_s3 [{time.perf_counter() - started:5.1f} s]: {line}", file=sys.stderr, flush=True)

    return say


def _write_store(path: Path, n_rows: int, d_model: int, chunk_rows: int) -> None:
    """A complete store of random fp16-representable rows (and one chunk of eval rows)."""
    gen = np.random.default_rng(0)
    rows = np.empty((n_rows, d_model), np.float16)
    for i in range(0, n_rows, 65_536):
        rows[i : i + 65_536] = gen.standard_normal((min(65_536, n_rows - i), d_model), dtype=np.float32)
    write_array_store(
        path, rows, rows[:chunk_rows], hook=HOOK, chunk_rows=chunk_rows, shard_chunks=DEFAULT_SHARD_CHUNKS
    )  # the layout a collect writes


# -- reading ------------------------------------------------------------------------------------------
def _measure_read(url: str, concurrency: int, batch_size: int, rounds: int) -> dict:
    store = open_store(url, concurrency=concurrency)
    keys = _chunk_keys(url, store)
    loader = ShuffledBatches(store, HOOK, batch_size, device=torch.device("cpu"), dtype=torch.float16, resident=False)
    epoch_bytes = loader.batches_per_epoch * batch_size * store.d_model * 2

    def one_epoch() -> float:
        """Seconds for one epoch of batches from a fresh loader (its start-up counts)."""
        started = time.perf_counter()
        batches = loader.batches(0)
        for _ in range(loader.batches_per_epoch):
            next(batches)
        elapsed = time.perf_counter() - started
        batches.close()
        return elapsed

    baseline = psutil.Process().memory_info().rss
    with _peak_rss() as peak:  # an untimed epoch: sampling the RSS takes time from the reading
        one_epoch()
    peak_growth = peak() - baseline

    def loader_side() -> float:
        return epoch_bytes / one_epoch()

    raw_client = _RawGets(url, keys, concurrency)

    def raw_side() -> float:
        """Bytes/s of GETs of every chunk object, `concurrency` in flight, bytes dropped on arrival."""
        started = time.perf_counter()
        got = raw_client.get_all()
        return got / (time.perf_counter() - started)

    try:
        rates = _rounds({"loader_bytes_per_s": loader_side, "raw_get_bytes_per_s": raw_side}, rounds)
    finally:
        raw_client.close()
    ratio, ratios = _round_ratios(rates, "loader_bytes_per_s", "raw_get_bytes_per_s")
    medians = _medians(rates)
    bound = ShuffledBatches.buffer_bytes_for(store.chunk_rows, store.d_model) + ShuffledBatches.remote_fetch_bytes_for(
        store.chunk_rows, store.d_model, concurrency
    )
    return {
        "s3_read_vs_raw_get": ratio,
        "s3_read": {
            **rates,
            **medians,
            "round_ratios": ratios,
            "loader_batches_per_s_median": medians["loader_bytes_per_s_median"] / (batch_size * store.d_model * 2),
            "epoch_bytes": epoch_bytes,
            "chunks": len(keys),
            "shard_objects": len({path for path, _, _ in keys}),
            "batch_size": batch_size,
            "peak_rss_growth_bytes": peak_growth,
            "memory_bound_bytes": bound,
        },
    }


class _RawGets:
    """Plain parallel GETs with the S3 client the store reader uses (same connections, one GET per
    object), on fsspec's event loop; the client is made and its session opened before any timing."""

    def __init__(self, url: str, keys: list[list], concurrency: int):
        import s3fs

        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options(url, concurrency))
        self.keys, self.concurrency = keys, concurrency
        self.client = fsspec.asyn.sync(self.fs.loop, self.fs.set_session)
        fsspec.asyn.sync(self.fs.loop, self._get_all, keys[:1])

    def close(self) -> None:
        fsspec.asyn.sync(self.fs.loop, self.client.close)

    def get_all(self) -> int:
        """Total bytes of one GET of every key."""
        return fsspec.asyn.sync(self.fs.loop, self._get_all, self.keys)

    async def _get_all(self, keys: list[list]) -> int:
        gate = asyncio.Semaphore(self.concurrency)

        async def get(key: list) -> int:
            path, start, end = key
            async with gate:
                return len(await self.fs._cat_file(path, start=start, end=end))

        return sum(await asyncio.gather(*(get(key) for key in keys)))


@contextlib.contextmanager
def _peak_rss(interval_s: float = 0.005) -> Iterator[Callable[[], int]]:
    """The process's peak RSS while the block runs, sampled (the kernel's high-water mark cannot be
    reset from here, and it remembers the store's writing)."""
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)


def _rounds(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Every side once per round, the order turning round by round (a background load that comes or goes
    favours no side); each side's rates."""
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(sides[name]())
    return rates


def _round_ratios(rates: dict[str, list[float]], top: str, bottom: str) -> tuple[float, list[float]]:
    """The median of the rounds' top/bottom ratios (a round's runs ran back to back under the same
    background load: steadier than the ratio of medians on a shared machine), and those ratios."""
    ratios = [a / b for a, b in zip(rates[top], rates[bottom])]
    return statistics.median(ratios), ratios


def _medians(rates: dict[str, list[float]]) -> dict[str, float]:
    return {f"{name}_median": statistics.median(values) for name, values in rates.items()}


# -- training -----------------------------------------------------------------------------------------
def _measure_train(
    url: str,
    local: Path,
    scratch: Path,
    concurrency: int,
    batch_size: int,
    width: int,
    k: int,
    steps: int,
    rounds: int,
) -> dict:
    """Steps/s of the real training step (TrainingRun.step) fed by the streaming loader, from s3:// and
    from the local store; and, as a control, from the local store while another process pulls the same
    bytes per second from the S3 server (what moving the data through a server on these same cores
    costs, whoever pulls it). Each round starts a fresh loader at the run's next batch, so no side
    gains from batches read ahead while another side ran."""
    s3_run = _TimedTraining(url, scratch / "run-s3", concurrency, batch_size, width, k)
    local_run = _TimedTraining(str(local), scratch / "run-local", concurrency, batch_size, width, k)
    step_bytes = batch_size * local_run.store.d_model * 2
    keys = _chunk_keys(url, s3_run.store)
    s3_rates = [s3_run.rate(10)]  # torch's first steps allocate; and a first rate for the control's traffic

    def s3_side() -> float:
        s3_rates.append(s3_run.rate(steps))
        return s3_rates[-1]

    def local_with_traffic() -> float:
        object_bytes = s3_run.store.chunk_rows * step_bytes // batch_size + 4
        with _traffic(keys, object_bytes, statistics.median(s3_rates) * step_bytes, concurrency):
            return local_run.rate(steps)

    local_run.rate(2)
    rates = _rounds(
        {
            "s3_steps_per_s": s3_side,
            "local_steps_per_s": lambda: local_run.rate(steps),
            "local_with_s3_traffic_steps_per_s": local_with_traffic,
        },
        rounds,
    )
    ratio, ratios = _round_ratios(rates, "s3_steps_per_s", "local_steps_per_s")
    control, control_ratios = _round_ratios(rates, "s3_steps_per_s", "local_with_s3_traffic_steps_per_s")
    medians = _medians(rates)
    return {
        "s3_train_vs_local": ratio,
        "s3_train": {
            **rates,
            **medians,
            "round_ratios": ratios,
            "s3_vs_local_with_s3_traffic": control,
            "round_ratios_vs_local_with_s3_traffic": control_ratios,
            "steps_per_round": steps,
            "width": width,
            "k": k,
            "batch_size": batch_size,
            "data_bytes_per_s_at_local_rate": medians["local_steps_per_s_median"] * step_bytes,
        },
    }


def _chunk_keys(url: str, store) -> list[list]:
    """[bucket path, first byte, end byte] of each training chunk of `store`, opened from `url`: a chunk
    object whole (end None), or a chunk's range of its shard object, as its shard's index gives it."""
    import s3fs

    arr = store.acts("train", HOOK)
    n_chunks = -(-store.n_rows("train") // store.chunk_rows)
    per_shard = shards.shard_chunks(arr)
    path = lambda i: f"{url.removeprefix('s3://')}/{arr.path}/{arr.metadata.encode_chunk_key((i, 0))}"  # noqa: E731
    if arr.shards is None:
        return [[path(c), 0, None] for c in range(n_chunks)]
    fs, keys = s3fs.S3FileSystem(), []
    for shard in range(-(-n_chunks // per_shard)):
        index = shards.decode_index(fs.cat_file(path(shard), start=-shards.index_bytes(per_shard)), per_shard)
        for inner in range(min(per_shard, n_chunks - shard * per_shard)):
            start, nbytes = (int(v) for v in index[inner])
            keys.append([path(shard), start, start + nbytes])
    return keys


# Another process pulling chunks (objects, or ranges of shard objects) from the S3 server at a given rate, `concurrency` at a time.
_TRAFFIC_CHILD = """
import asyncio, json, sys, time
import s3fs
from store_schema.reader import storage_options

keys, rate, concurrency, url, object_bytes = json.loads(sys.argv[1])

async def main():
    fs = s3fs.S3FileSystem(asynchronous=True, **storage_options(url, concurrency))
    await fs.set_session()
    gate, started, requested = asyncio.Semaphore(concurrency), time.perf_counter(), 0

    async def get(key):
        nonlocal requested
        path, start, end = key
        async with gate:
            due = started + requested * object_bytes / rate  # evenly spaced requests make the rate
            requested += 1
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            await fs._cat_file(path, start=start, end=end)

    print("pulling", flush=True)
    while True:
        await asyncio.gather(*(get(key) for key in keys))

asyncio.run(main())
"""


@contextlib.contextmanager
def _traffic(keys: list[list], object_bytes: int, bytes_per_s: float, concurrency: int) -> Iterator[None]:
    """Another process pulling the chunks `keys` (_chunk_keys; each `object_bytes`) from the S3 server
    while the block runs, at `bytes_per_s`."""
    url = f"s3://{keys[0][0]}"
    child = subprocess.Popen(
        [sys.executable, "-c", _TRAFFIC_CHILD, json.dumps([keys, bytes_per_s, concurrency, url, object_bytes])],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if child.stdout.readline().strip() != "pulling":
            raise RuntimeError("the traffic process of the control side did not start")
        yield
    finally:
        child.kill()
        child.wait()


class _TimedTraining:
    """A TopK training run (the training loop's own step) on the streaming loader of one store."""

    def __init__(self, location: str, out: Path, concurrency: int, batch_size: int, width: int, k: int):
        cfg = TrainConfig.from_flat(
            store=location,
            out=str(out),
            hook=HOOK,
            arch="topk",
            width=width,
            k=k,
            tokens=batch_size * 100_000,
            batch_size=batch_size,
            device="cpu",
            resident=False,
            overwrite=True,
            progress=False,
        ).validate()
        self.store = open_store(location, concurrency=concurrency)
        self.run = fresh_training_run(cfg, self.store, torch.device("cpu"))
        self.loader = ShuffledBatches(
            self.store, HOOK, batch_size, device=torch.device("cpu"), seed=cfg.seed, resident=False
        )
        self.taken = 0

    def rate(self, n: int) -> float:
        """Steps/s over n steps, timed from the first batch in hand: a run starts its loader once, and
        each round here starts one afresh."""
        autocast = contextlib.nullcontext()
        batches = self.loader.batches(self.taken)
        try:
            x = next(batches)
            started = time.perf_counter()
            for i in range(n):
                self.run.step(x, self.taken + i, autocast)
                x = next(batches)
        finally:
            batches.close()
        self.taken += n + 1
        return n / (time.perf_counter() - started)


# -- store copy ---------------------------------------------------------------------------------------
def copy_for_peak_rss(args: dict) -> dict:
    """In a fresh process (run_in_child), so that its peak RSS is the copy's own: `store copy`, timed."""
    before = rss_bytes()
    started = time.perf_counter()
    done = copy_store(args["src"], args["dst"], progress=False)
    return {**done, "seconds": time.perf_counter() - started, "rss_before": before, "peak": peak_rss_bytes()}


def _measure_copy(url: str, destination: Path) -> dict:
    """`store copy` from s3:// to a local folder with its default threads: wall time and peak RSS."""
    args = {"src": url, "dst": str(destination)}
    copied = run_in_child(f"{__name__}.copy_for_peak_rss", args, f"the copy from {url}")
    shutil.rmtree(destination, ignore_errors=True)
    return {
        "s3_copy": {
            "threads": COPY_THREADS,
            "bytes": copied["bytes_copied"],
            "files": copied["files_copied"],
            "seconds": copied["seconds"],
            "bytes_per_s": copied["bytes_copied"] / copied["seconds"],
            "peak_rss_bytes": copied["peak"],
            "rss_after_imports_bytes": copied["rss_before"],
            "peak_rss_growth_bytes": copied["peak"] - copied["rss_before"],
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure streaming from S3 (moto behind a latency proxy).")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="folder for scratch files")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds added to every request")
    args = parser.parse_args()
    print(json.dumps(measure_s3_streaming(args.scratch, latency_s=args.latency), indent=2))


if __name__ == "__main__":
    main()
