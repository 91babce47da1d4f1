"""Collect's own ceiling: a collect with the null host model (`null-d<N>`, no work per token), so every
second is collect's own work (tokenizing, normalizing, permuting, the fp16 cast, statistics, checksums,
writes, commits). On a GPU the forward pass is that fast; this is the speed stage one then has.

Keys (each side alternated round by round with the others of its ratio, medians):
- collect_ceiling_tokens_per_s_d576 / _d2304: one hook, context 1024, fsync on (reported);
- collect_ceiling_vs_disk: the d-576 ceiling in bytes/s over a raw sequential write of the same bytes
  (`os.write` of the store's chunk size, an fsync per block, as collect's commits);
- collect_ceiling_multi_hook: 8 hooks of d 576 over one, in bytes/s (an eighth of the tokens in blocks of an
  eighth of the rows: the same bytes in as many blocks);
- store_write_vs_disk (reported): the store writer alone (`StoreWriter.write_rows` of the d-576 store's rows in
  blocks of the collect's size, starting mid-chunk as collect's blocks do, each block's files flushed as a
  commit flushes them) over the same raw sequential write: how much of the disk the write path leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.measurements import alternate, ratio
from stages.basics.device import synchronize
from stages.collect import run_collect
from stages.collect.config import DEFAULT_SHARD_CHUNKS, CollectConfig
from stages.host_model.loading import load_host_model
from store_schema import schema
from store_schema.durable import chunk_files, fsync_files
from store_schema.reader import open_store
from store_schema.writer import StoreWriter

CONTEXT = 1024
MULTI_HOOKS = 8


def collect_config(out: Path, width: int, hooks: tuple[str, ...], tokens: int, device: torch.device) -> CollectConfig:
    """A collect of the null model of `width`: `tokens` tokens at context 1024, fsync on."""
    return CollectConfig(
        model=f"null-d{width}",
        dataset="synthetic-text",
        hooks=hooks,
        tokens=tokens,
        context_size=CONTEXT,
        eval_fraction=0.0,
        device=str(device),
        out=str(out),
        overwrite=True,
        warmup_rows=min(65_536, tokens // 4),
        progress=False,
    )


def collect_rate(cfg: CollectConfig, model=None, profile: bool = False) -> dict:
    """One collect, timed: tokens and bytes of stored activations per second; with `profile` (CUDA), the
    share of its wall time no kernel ran (torch.profiler's device time over the wall time)."""
    model = model if model is not None else load_host_model(cfg.model, cfg.device)
    profiler = contextlib.nullcontext()
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        profiler = torch.profiler.profile(activities=activities)
    synchronize(model.device)
    started = time.perf_counter()
    with profiler as prof:
        run_collect(cfg, model=model)
        synchronize(model.device)
    elapsed = time.perf_counter() - started
    store = open_store(cfg.out)
    rows = store.n_rows("train")
    out = {
        "tokens_per_s": rows / elapsed,
        "bytes_per_s": rows * sum(store.width(h) for h in store.hooks) * 2 / elapsed,
        "seconds": elapsed,
    }
    if profile:
        busy_us = sum(event.self_device_time_total for event in prof.key_averages())
        out["idle_share"] = max(0.0, 1 - busy_us / 1e6 / elapsed)
    return out


class _Ceiling:
    """One null-model collect configuration, timed again at each call; the model is loaded once."""

    def __init__(self, cfg: CollectConfig, device: torch.device):
        self.cfg, self.model = cfg, load_host_model(cfg.model, str(device))

    def bytes_per_s(self) -> float:
        return collect_rate(self.cfg, self.model)["bytes_per_s"]

    def tokens_per_s(self) -> float:
        return collect_rate(self.cfg, self.model)["tokens_per_s"]


def raw_write_bytes_per_s(folder: Path, total_bytes: int, chunk_bytes: int, block_bytes: int) -> float:
    """A plain sequential write of `total_bytes` in `chunk_bytes` pieces, each block's worth fsynced."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "raw.bin"
    piece = np.random.default_rng(0).integers(0, 255, chunk_bytes, dtype=np.uint8).tobytes()
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = since_sync = 0
        while written < total_bytes:
            written += os.write(fd, piece)
            since_sync += len(piece)
            if since_sync >= block_bytes:
                os.fsync(fd)
                since_sync = 0
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return written / elapsed


def writer_bytes_per_s(store_path: Path, hook: str, block_rows: int) -> float:
    """The store writer alone: every train row of the store rewritten with random rows in blocks of
    `block_rows`, the first starting mid-chunk (into a sharded store: a shard at a time, as its commits
    write), each block's files flushed (a durable commit's share)."""
    writer = StoreWriter.open(store_path)
    n, chunk = writer.progress("train").rows_committed, writer.chunk_rows("train")
    # collect's writes: blocks that start mid-chunk, or, into a sharded store, whole shards
    shard = writer.header.shard_rows
    starts = list(range(0, n, shard)) if shard else [0, *range(chunk // 2, n, block_rows)]
    most = max(stop - start for start, stop in zip(starts, starts[1:] + [n]))
    rows = np.random.default_rng(0).standard_normal((most, writer.header.width(hook)), np.float32)
    rows = rows.astype(np.float16)
    mapping = np.zeros(most, np.int32), np.zeros(most, np.int16)
    arrays = [writer.group[name] for name in schema.row_array_names(writer.header, "train")]
    started = time.perf_counter()
    for start, stop in zip(starts, starts[1:] + [n]):
        size = stop - start
        writer.write_rows("train", start, {hook: rows[:size]}, mapping[0][:size], mapping[1][:size])
        fsync_files(path for arr in arrays for path in chunk_files(store_path, arr, start, stop))
    writer.chunk_files.close()
    return n * rows.shape[1] * 2 / (time.perf_counter() - started)


def bench_collect_ceiling(tokens: int, rounds: int, workdir: Path, device: torch.device) -> dict:
    hook = "blocks.1.hook_resid_post"
    d576 = _Ceiling(collect_config(workdir / "ceiling-d576.zarr", 576, (hook,), tokens, device), device)
    d576.bytes_per_s()  # warm-up: the first collect pays for imports and the page cache
    store = open_store(d576.cfg.out)
    chunk_bytes = store.group[schema.acts_path("train", hook)].chunks[0] * 576 * 2
    block_bytes = d576.cfg.shuffle_buffer_rows * 576 * 2
    total_bytes = store.n_rows("train") * 576 * 2
    many = tuple(f"blocks.{layer}.{suffix}" for layer in range(2) for suffix in
                 ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"))[:MULTI_HOOKS]  # fmt: skip
    # an eighth of the tokens in blocks of an eighth of the rows: the same bytes, in as many blocks
    multi_cfg = collect_config(workdir / "ceiling-multi.zarr", 576, many, tokens // MULTI_HOOKS, device)
    # and shards of an eighth of the rows (two chunks, not sixteen): a commit still takes two blocks, as
    # one hook's does; with sixteen the whole store would be one shard, written only after the last block
    multi_cfg = dataclasses.replace(
        multi_cfg,
        shuffle_buffer_rows=d576.cfg.shuffle_buffer_rows // MULTI_HOOKS,
        shard_chunks=DEFAULT_SHARD_CHUNKS // MULTI_HOOKS,
    )
    multi = _Ceiling(multi_cfg, device)
    rates = alternate(
        {
            "one_hook_bytes_per_s": d576.bytes_per_s,
            "disk_bytes_per_s": lambda: raw_write_bytes_per_s(workdir / "raw", total_bytes, chunk_bytes, block_bytes),
            "multi_hook_bytes_per_s": multi.bytes_per_s,
            "writer_bytes_per_s": lambda: writer_bytes_per_s(Path(d576.cfg.out), hook, d576.cfg.shuffle_buffer_rows),
        },
        rounds,
    )
    d576_tokens = float(np.median(rates["one_hook_bytes_per_s"])) / (576 * 2)
    # a quarter of the tokens, and shards of a quarter of the rows (the d-576 shard's bytes): commits come
    # as often as the d-576 collect's, where sixteen chunks would make the store one shard
    wide_cfg = collect_config(workdir / "ceiling-d2304.zarr", 2304, (hook,), tokens // 4, device)
    wide = _Ceiling(dataclasses.replace(wide_cfg, shard_chunks=DEFAULT_SHARD_CHUNKS // 4), device)
    d2304_tokens = float(np.median([wide.tokens_per_s() for _ in range(rounds)]))
    for cfg in (d576.cfg, multi.cfg, wide.cfg):
        shutil.rmtree(cfg.out, ignore_errors=True)
    return {
        "collect_ceiling_tokens_per_s_d576": d576_tokens,
        "collect_ceiling_tokens_per_s_d2304": d2304_tokens,
        "collect_ceiling_vs_disk": ratio(rates, "one_hook_bytes_per_s", "disk_bytes_per_s"),
        "collect_ceiling_multi_hook": ratio(rates, "multi_hook_bytes_per_s", "one_hook_bytes_per_s"),
        "store_write_vs_disk": ratio(rates, "writer_bytes_per_s", "disk_bytes_per_s"),
        "collect_ceiling": {
            **rates,
            "context_size": CONTEXT,
            "tokens": tokens,
            "tokens_d2304": tokens // 4,
            "multi_hooks": list(many),
            "chunk_bytes": chunk_bytes,
            "block_bytes": block_bytes,
            "device": str(device),
        },
    }
