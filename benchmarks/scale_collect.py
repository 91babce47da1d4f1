"""Collect at two corpus sizes with the synthetic host model (its forward pass costs next to nothing, so
collect's own work is what is timed): does its peak memory or its commit time grow with the corpus?

Each collect runs in a fresh process through `run_collect`, the command's own code path, with fsync on
(the default); the child times every commit's write and commit by wrapping the writer's methods (a
commit writes whole shards: the blocks it finishes, and the head of the next)."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from benchmarks.child import peak_rss_bytes, run_in_child

SYNTHETIC_HOOK = "blocks.1.hook_resid_post"


def timed_collect(args: dict) -> dict:
    """In the child: collect `args` (CollectConfig fields); per-commit write and commit seconds, and the
    process's peak RSS."""
    from stages.collect.config import CollectConfig
    from stages.collect.run import run_collect
    from store_schema.writer import StoreWriter

    commits: list[dict] = []
    write_rows, commit_blocks = StoreWriter.write_rows, StoreWriter.commit_blocks
    pending_write = {"seconds": 0.0}

    def timed_write_rows(self, *a, **k):
        started = time.perf_counter()
        write_rows(self, *a, **k)
        pending_write["seconds"] += time.perf_counter() - started

    def timed_commit_blocks(self, split, blocks, *a, **k):
        started = time.perf_counter()
        commit_blocks(self, split, blocks, *a, **k)
        commit = time.perf_counter() - started
        commits.append({"split": split, "blocks": len(blocks), "write_s": pending_write["seconds"], "commit_s": commit})
        pending_write["seconds"] = 0.0

    StoreWriter.write_rows, StoreWriter.commit_blocks = timed_write_rows, timed_commit_blocks
    started = time.perf_counter()
    run_collect(CollectConfig(**args))
    return {"seconds": time.perf_counter() - started, "commits": commits, "peak_rss_bytes": peak_rss_bytes()}


def _tenths(commits: list[dict], key: str) -> tuple[float, float]:
    """Median `key` of the first and of the last tenth of the training commits."""
    train = [c[key] for c in commits if c["split"] == "train"]
    tenth = max(1, len(train) // 10)
    return statistics.median(train[:tenth]), statistics.median(train[-tenth:])


def measure_collect_growth(workdir: Path, small_tokens: int, large_tokens: int, progress: bool = True) -> dict:
    """Collect `small_tokens` and then `large_tokens` of the synthetic model; the ratios and raw figures."""
    runs = {}
    for name, tokens in (("small", small_tokens), ("large", large_tokens)):
        out = workdir / f"collect-{name}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        args = {
            "out": str(out),
            "model": "synthetic",
            "dataset": "synthetic-text",
            "hooks": [SYNTHETIC_HOOK],
            "tokens": tokens,
            "device": "cpu",
            "progress": progress,
        }
        result = run_in_child(f"{__name__}.timed_collect", args, f"the {tokens:,}-token collect", progress)
        store_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shutil.rmtree(out)
        first, last = _tenths(result["commits"], "commit_s")
        first_write, last_write = _tenths(result["commits"], "write_s")
        runs[name] = {
            "tokens": tokens,
            "seconds": round(result["seconds"], 2),
            "tokens_per_s": round(tokens / result["seconds"]),
            "store_bytes": store_bytes,
            "train_blocks": sum(c["blocks"] for c in result["commits"] if c["split"] == "train"),
            "train_commits": sum(c["split"] == "train" for c in result["commits"]),
            "peak_rss_bytes": result["peak_rss_bytes"],
            "commit_s_first_tenth_median": first,
            "commit_s_last_tenth_median": last,
            "write_s_first_tenth_median": first_write,
            "write_s_last_tenth_median": last_write,
        }
    large = runs["large"]
    return {
        "collect_rss_ratio": large["peak_rss_bytes"] / runs["small"]["peak_rss_bytes"],
        "collect_commit_ratio": large["commit_s_last_tenth_median"] / large["commit_s_first_tenth_median"],
        "collect": {"model": "synthetic", "hook": SYNTHETIC_HOOK, **runs},
    }
