"""`python -m benchmarks scale` (make scale): what changes when a store gets big, measured on this machine through the
real code paths (docs/scale.md). Writes OUT/scale.json, each key beside its raw figures, and removes its
scratch stores as it goes.

Parts, each a function returning its keys:
- collect: peak memory and commit time of a collect at two corpus sizes (synthetic host model);
- metadata: the root metadata of a store of 8 hooks of d 4096;
- big_store: a store bigger than memory, read cold by the loader and by plain sequential reads, and
  trained from against a resident store;
- s3: streaming from an S3 server (moto, on loopback) behind an injected per-request latency;
- fsync: what flushing every commit costs collect (the bench's collect_vs_forward, with and without)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import bench
from benchmarks.measurements import run_parts, targets_table
from benchmarks.scale_big_store import measure_big_store
from benchmarks.scale_collect import measure_collect_growth
from benchmarks.scale_s3 import measure_s3_streaming
from stages.basics.defaults import DEFAULT_HOOK, DEFAULT_MODEL
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.basics.settings import progress_setting, setting
from store_schema import schema
from store_schema.normalization import Normalization
from store_schema.writer import StoreWriter

TARGETS = {
    "collect_rss_ratio": ("<=", 1.1),
    "collect_commit_ratio": ("<=", 1.2),
    "root_metadata_bytes": ("<=", 65_536),
    "big_store_gb": (">=", 30),
    "big_store_read_vs_disk": (">=", 0.8),
    "big_store_peak_rss_gb": ("<=", None),  # the loader's window buffers + 1 GB, known once measured
    "big_store_train_vs_resident": (">=", 0.9),
    "s3_read_vs_raw_get": (">=", 0.8),
    "s3_train_vs_local": (">=", 0.9),
    "s3_collect_vs_raw_put": (">=", 0.7),  # collect straight to s3:// (null model) over plain parallel PUTs
    "fsync_cost": ("<=", 0.02),
}
PARTS = ("collect", "metadata", "big_store", "s3", "fsync")


@dataclass
class ScaleConfig:
    out: Path = setting(Path("runs/scale"), "folder for scale.json and the scratch stores")
    collect_tokens: tuple[int, ...] = setting(
        (10_000_000, 100_000_000), "the two corpus sizes collect is compared at (tokens)"
    )
    big_store_gb: float = setting(32.0, "size of the store bigger than memory (GB)")
    s3_latency_ms: float = setting(30.0, "latency injected into every S3 request (ms)")
    model: str = setting(DEFAULT_MODEL, "host model of the fsync measurement")
    collect_hook: str = setting(DEFAULT_HOOK, "hook of the fsync measurement", flag="--hook")
    only: str = setting("", f"comma-separated parts to run ({', '.join(PARTS)})", shown_default="all")
    progress: bool = progress_setting()
    train_steps: int = 120  # steps of each training run of the big-store part
    s3_options: dict | None = None  # sizes for measure_s3_streaming (tests make them tiny)
    fsync_contexts: int = 128  # contexts of each side of the fsync measurement

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def parts(self) -> tuple[str, ...]:
        named = tuple(part.strip() for part in self.only.split(",") if part.strip())
        return named or PARTS

    def check(self) -> None:
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise SaepipeError(f"--only: unknown part {', '.join(unknown)}; known: {', '.join(PARTS)}")
        if len(self.collect_tokens) != 2 or not 0 < self.collect_tokens[0] < self.collect_tokens[1]:
            raise SaepipeError(
                f"--collect-tokens takes two sizes, smaller first (e.g. 10000000,100000000), got {self.collect_tokens}"
            )
        if self.big_store_gb <= 0 or self.s3_latency_ms < 0:
            raise SaepipeError("--big-store-gb must be positive and --s3-latency-ms not negative")


def root_metadata_bytes(workdir: Path, hooks: int = 8, d: int = 4096) -> dict:
    """The root zarr.json of a store of `hooks` hooks of width `d` after a few commits with skipped
    contexts (the unit test tests/store_schema/test_metadata_size.py checks the same bound)."""
    path = workdir / "metadata.zarr"
    shutil.rmtree(path, ignore_errors=True)
    names = [f"blocks.{i}.hook_resid_post" for i in range(hooks)]
    header = schema.new_header(
        writer="scale", config_fingerprint="scale", collect_config={}, model={"name": "scale"},
        text_source={"name": "scale"}, tokenizer={}, context_size=2, dropped_positions=[0], excluded_tokens=[],
        outlier_factor=10.0, hooks=names, d_model=d, token_budget=64, shuffle={}, split={},
        normalization_mode="center-scale", warmup_rows=0, nonfinite_policy="skip",
    )  # fmt: skip
    split = np.zeros(80, np.int8)
    split[64:] = 1
    writer = StoreWriter.create(path, header, np.ones((80, 2), np.int32), split, chunk_rows=16, durable=False)
    rng = np.random.default_rng(0)
    writer.record_normalization(
        {h: Normalization("center-scale", rng.standard_normal(d).astype(np.float32), 0.5, 100.0) for h in names}
    )
    for block in range(4):
        for name, n in (("train", 16), ("eval", 4)):
            stats = {}
            for hook in names:
                stats[hook] = writer.running_stats(name, hook)
                stats[hook].update(rng.standard_normal((n, d)).astype(np.float16))
            writer.commit(name, block + 1, (block + 1) * n, stats, list(range(block * 100, block * 100 + 50)))
    size = (path / "zarr.json").stat().st_size
    shutil.rmtree(path)
    return {"root_metadata_bytes": size, "metadata": {"hooks": hooks, "d": d, "commits_per_split": 4}}


def fsync_cost(cfg: ScaleConfig, workdir: Path) -> dict:
    """The bench's collect_vs_forward with and without flushing, on the host model (docs/benchmarks.md)."""
    bench_cfg = bench.BenchConfig(
        out=workdir, device="cpu", model=cfg.model, collect_hook=cfg.collect_hook, progress=False
    )
    bench_cfg.collect_contexts = cfg.fsync_contexts
    result = bench.bench_collect(bench_cfg, workdir, resolve_device("cpu"))
    shutil.rmtree(workdir / "collect.zarr", ignore_errors=True)
    return {
        "fsync_cost": result["fsync_cost"],
        "fsync": {"collect_vs_forward": result["collect_vs_forward"], **result["collect"]},
    }


def run_scale(cfg: ScaleConfig) -> dict:
    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    workdir = cfg.out / "work"
    workdir.mkdir(exist_ok=True)
    parts: dict[str, Callable[[], dict]] = {
        "collect": lambda: measure_collect_growth(workdir, *cfg.collect_tokens, progress=cfg.progress),
        "metadata": lambda: root_metadata_bytes(workdir),
        "big_store": lambda: measure_big_store(
            workdir, cfg.big_store_gb, train_steps=cfg.train_steps, progress=cfg.progress
        ),
        "s3": lambda: measure_s3_streaming(
            workdir / "s3", latency_s=cfg.s3_latency_ms / 1000, progress=cfg.progress, **(cfg.s3_options or {})
        ),
        "fsync": lambda: fsync_cost(cfg, workdir),
    }
    result: dict = {
        "machine": bench._describe_device(resolve_device("cpu")),
        "versions": bench._versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    run_parts({name: parts[name] for name in cfg.parts}, result, cfg.out / "scale.json", "scale", cfg.progress)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def format_scale_table(result: dict) -> str:
    limits = {"big_store_peak_rss_gb": result["big_store"]["peak_rss_limit_gb"]} if "big_store" in result else {}
    return targets_table(result, TARGETS, limits)
