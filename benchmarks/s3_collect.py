"""A collect straight to S3 against plain parallel PUTs of the same bytes, through the same server.

The collect uses the null host model (no forward work: benchmarks/collect_ceiling.py), so what it measures
is the rest of stage one when its output goes to a bucket: the collect's own work, the staging store's
writes, and the mirror's uploads and remote commits. The raw side PUTs every file a local collect of the
same configuration wrote, `threads` at a time (the mirror's own number of uploads in flight), with no
other work. Run inside `s3_server` and `s3_environment` (benchmarks/s3_latency.py), with a bucket made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import shutil
import statistics
import time
import uuid
from pathlib import Path

import fsspec.asyn
import psutil
import torch

from benchmarks.collect_ceiling import collect_config
from stages.collect import run_collect
from stages.host_model.loading import load_host_model
from store_schema.mirror import RemoteMirror

UPLOADS_IN_FLIGHT = inspect.signature(RemoteMirror).parameters["threads"].default
HOOK = "blocks.1.hook_resid_post"


def measure_s3_collect(bucket: str, scratch: Path, tokens: int, width: int, rounds: int, alternate) -> dict:
    """{s3_collect_vs_raw_put, s3_collect: details}; `alternate(sides, rounds)` runs the sides in turns and
    returns each side's rates (bytes/s of the store's files)."""
    device = torch.device("cpu")
    model = load_host_model(f"null-d{width}", str(device))
    local = collect_config(scratch / "s3-collect-local.zarr", width, (HOOK,), tokens, device)
    run_collect(local, model=model)
    files = [path for path in sorted(Path(local.out).rglob("*")) if path.is_file()]
    bodies = [(str(path.relative_to(local.out)), path.read_bytes()) for path in files]
    total = sum(len(body) for _, body in bodies)
    shutil.rmtree(local.out)
    puts = _RawPuts(bucket, bodies, UPLOADS_IN_FLIGHT)

    busy: dict[str, list[float]] = {"collect": [], "raw_put": []}

    def timed(side: str, work) -> float:
        """Bytes/s of `work()`; notes the share of the machine's cores this process and the S3 server
        (its child) kept busy meanwhile: near 1, the two sides share a saturated CPU."""
        cpu_before, started = _cpu_seconds(), time.perf_counter()
        work()
        elapsed = time.perf_counter() - started
        busy[side].append((_cpu_seconds() - cpu_before) / (elapsed * (os.cpu_count() or 1)))
        return total / elapsed

    def collect_side() -> float:
        cfg = dataclasses.replace(local, out=f"s3://{bucket}/{uuid.uuid4().hex}.zarr", overwrite=False)
        return timed("collect", lambda: run_collect(cfg, model=model))

    def raw_side() -> float:
        return timed("raw_put", lambda: puts.put_all(uuid.uuid4().hex))

    try:
        rates = alternate({"collect_bytes_per_s": collect_side, "raw_put_bytes_per_s": raw_side}, rounds)
    finally:
        puts.close()
    ratios = [a / b for a, b in zip(rates["collect_bytes_per_s"], rates["raw_put_bytes_per_s"])]
    return {
        "s3_collect_vs_raw_put": statistics.median(ratios),
        "s3_collect": {
            **rates,
            **{f"{side}_median": statistics.median(values) for side, values in rates.items()},
            "round_ratios": ratios,
            "cpu_busy_share": busy,
            "tokens": tokens,
            "width": width,
            "files": len(bodies),
            "bytes": total,
            "uploads_in_flight": UPLOADS_IN_FLIGHT,
        },
    }


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its children (the S3 server, its proxy)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total


class _RawPuts:
    """Plain parallel PUTs of `bodies` ((key, bytes)) under a fresh prefix, `concurrency` in flight, on one
    s3fs client made (and its session opened) before any timing."""

    def __init__(self, bucket: str, bodies: list[tuple[str, bytes]], concurrency: int):
        import s3fs

        self.fs = s3fs.S3FileSystem(skip_instance_cache=True)
        self.bucket, self.bodies, self.concurrency = bucket, bodies, concurrency
        self.client = fsspec.asyn.sync(self.fs.loop, self.fs.set_session)

    def close(self) -> None:
        fsspec.asyn.sync(self.fs.loop, self.client.close)

    def put_all(self, prefix: str) -> None:
        fsspec.asyn.sync(self.fs.loop, self._put_all, prefix)

    async def _put_all(self, prefix: str) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def put(key: str, body: bytes) -> None:
            async with gate:
                await self.fs._pipe_file(f"{self.bucket}/{prefix}/{key}", body)

        await asyncio.gather(*(put(key, body) for key, body in self.bodies))
