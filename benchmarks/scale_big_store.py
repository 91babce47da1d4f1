"""A store bigger than this machine's memory: written through the real writer, then read with the page
cache dropped, by a plain sequential read of its chunk files and by the streaming loader, and trained
from (TopK, streaming) against the same run on a resident store of the same row width and chunking.

The page cache is dropped for the store's files with posix_fadvise(DONTNEED) (no root needed, and only
these files are affected): each read then comes from the disk, as it must for a store larger than RAM."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.child import peak_rss_bytes, run_in_child

HOOK = "big"
_POOL_ROWS = 65_536  # distinct random rows the store's rows are drawn from (content does not change speed)


def _acts_files(store: Path, split: str = "train") -> list[Path]:
    """The chunk files of the split's activations, in chunk order."""
    folder = store / split / "acts" / HOOK / "c"
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: int(p.parent.name))


def drop_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_big_store(path: Path, gigabytes: float, d: int, chunk_rows: int, progress: bool) -> int:
    """A store of about `gigabytes` of training rows (plus one chunk of eval rows); its row count."""
    from stages.collect.config import DEFAULT_SHARD_CHUNKS
    from store_schema.generated import write_generated_store

    n_train = max(1, int(gigabytes * 1e9 / (d * 2)) // chunk_rows) * chunk_rows
    pool = np.random.default_rng(7).standard_normal((_POOL_ROWS, d), dtype=np.float32).astype(np.float16)

    def rows(split: str, start: int, stop: int) -> np.ndarray:
        return pool[(np.arange(start, stop) * 7_919 + (split == "eval")) % _POOL_ROWS]

    shutil.rmtree(path, ignore_errors=True)
    with tqdm(total=n_train + chunk_rows, unit="row", unit_scale=True, desc="big store", disable=not progress) as bar:
        write_generated_store(
            path,
            {"train": n_train, "eval": chunk_rows},
            d,
            rows,
            hook=HOOK,
            chunk_rows=chunk_rows,
            shard_chunks=DEFAULT_SHARD_CHUNKS,  # the layout a collect writes
            on_rows=bar.update,
        )
    return n_train


def timed_reads(args: dict) -> dict:
    """In a fresh process: the disk's sequential read of the chunk files, then one epoch of the streaming
    loader's shuffled batches, each after dropping the files from the page cache; and the peak RSS."""
    import torch

    from store_schema.loader import ShuffledBatches
    from store_schema.reader import open_store

    path, batch_size = Path(args["store"]), args["batch_size"]
    files = _acts_files(path)
    drop_from_page_cache(files)
    buffer = bytearray(16 << 20)
    started, read = time.perf_counter(), 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                read += n
    disk_s = time.perf_counter() - started
    rss_before_loader = peak_rss_bytes()

    drop_from_page_cache(files)
    store = open_store(path)
    loader = ShuffledBatches(
        store, HOOK, batch_size, device=torch.device("cpu"), dtype=torch.float16, resident=False, seed=1
    )
    n_batches = loader.batches_per_epoch
    started = time.perf_counter()
    for i, _ in enumerate(loader.batches()):
        if i + 1 == n_batches:
            break
    loader_s = time.perf_counter() - started
    row_bytes = store.d_model * 2
    return {
        "disk_bytes": read,
        "disk_seconds": disk_s,
        "loader_bytes": n_batches * batch_size * row_bytes,
        "loader_seconds": loader_s,
        "loader_batches": n_batches,
        "buffer_bytes": ShuffledBatches.buffer_bytes_for(store.chunk_rows, store.d_model),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_before_loader_bytes": rss_before_loader,
    }


def timed_training(args: dict) -> dict:
    """In a fresh process: a TopK run (the `saepipe train` code path); its logged steps/s, the first
    window (start-up) left out."""
    from stages.train import TrainConfig, run_train

    store = Path(args.pop("store"))
    if args.pop("cold"):
        drop_from_page_cache(_acts_files(store))
    out = Path(run_train(TrainConfig.from_flat(store=str(store), **args)))
    rates = [json.loads(line)["it_per_s"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {
        "it_per_s_windows": rates,
        "it_per_s": statistics.median(rates[1:] or rates),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def measure_big_store(
    workdir: Path,
    gigabytes: float,
    *,
    d: int = 576,
    chunk_rows: int = 8192,
    width: int = 4096,
    k: int = 32,
    batch_size: int = 4096,
    train_steps: int = 120,
    progress: bool = True,
) -> dict:
    big, small = workdir / "big.zarr", workdir / "resident.zarr"
    started = time.perf_counter()
    n_rows = write_big_store(big, gigabytes, d, chunk_rows, progress)
    write_s = time.perf_counter() - started
    store_bytes = sum(f.stat().st_size for f in big.rglob("*") if f.is_file())
    if progress:
        print(f"scale: reading {store_bytes / 1e9:.1f} GB cold ...", file=sys.stderr, flush=True)
    reads = run_in_child(f"{__name__}.timed_reads", {"store": str(big), "batch_size": batch_size}, "the big-store read")
    train = {
        "hook": HOOK,
        "arch": "topk",
        "width": width,
        "k": k,
        "batch_size": batch_size,
        "tokens": train_steps * batch_size,
        "log_every": 10,
        "overwrite": True,
        "progress": False,
        "device": "cpu",
    }
    if progress:
        print("scale: training from the big store (streaming) and a resident one ...", file=sys.stderr, flush=True)
    streamed = run_in_child(
        f"{__name__}.timed_training",
        {**train, "store": str(big), "out": str(workdir / "run-big"), "resident": False, "cold": True},
        "training from the big store",
    )
    resident_rows = max(8 * chunk_rows, min(n_rows, 1_000_000_000 // (d * 2)) // chunk_rows * chunk_rows)
    write_big_store(small, resident_rows * d * 2 / 1e9, d, chunk_rows, progress=False)
    resident = run_in_child(
        f"{__name__}.timed_training",
        {**train, "store": str(small), "out": str(workdir / "run-resident"), "resident": True, "cold": False},
        "training from the resident store",
    )
    for leftover in (big, small, workdir / "run-big", workdir / "run-resident"):
        shutil.rmtree(leftover, ignore_errors=True)
    disk_rate = reads["disk_bytes"] / reads["disk_seconds"]
    loader_rate = reads["loader_bytes"] / reads["loader_seconds"]
    return {
        "big_store_gb": store_bytes / 1e9,
        "big_store_read_vs_disk": loader_rate / disk_rate,
        "big_store_peak_rss_gb": reads["peak_rss_bytes"] / 1e9,
        "big_store_train_vs_resident": streamed["it_per_s"] / resident["it_per_s"],
        "big_store": {
            "rows": n_rows,
            "d": d,
            "chunk_rows": chunk_rows,
            "store_bytes": store_bytes,
            "write_seconds": round(write_s, 1),
            "write_bytes_per_s": store_bytes / write_s,
            "memory_bytes": _memory_bytes(),
            "page_cache_dropped_by": "posix_fadvise(POSIX_FADV_DONTNEED) on each chunk file",
            "disk_bytes_per_s": disk_rate,
            "loader_bytes_per_s": loader_rate,
            **reads,
            "peak_rss_limit_gb": reads["buffer_bytes"] / 1e9 + 1.0,
            "train": {
                "arch": "topk",
                "width": width,
                "k": k,
                "batch_size": batch_size,
                "steps": train_steps,
                "streamed_it_per_s": streamed["it_per_s"],
                "resident_it_per_s": resident["it_per_s"],
                "resident_rows": resident_rows,
                "streamed_windows": streamed["it_per_s_windows"],
                "resident_windows": resident["it_per_s_windows"],
            },
        },
    }


def _memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
