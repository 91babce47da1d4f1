"""`saepipe bench`: speed as same-run ratios (docs/benchmarks.md); writes OUT/bench.json."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.commands.options import options
from pipeline.tools.bench import BenchConfig, format_bench_table, run_bench


@click.command()
@options(BenchConfig, "out", "device", "only", "d_in", "width", "wide_width", "k", "batch_size", "rounds")
@options(BenchConfig, "model", "collect_hook")
@options(BenchConfig, "progress")
def bench(**values) -> None:
    """Measure speed as same-run ratios (reader, training, matching pursuit, collect, memory); writes
    OUT/bench.json. Needs sae-lens for the SAELens comparisons, eai-sparsify for sparsify's."""
    cfg = BenchConfig(**values)
    result = run_bench(cfg)
    click.echo(format_bench_table(result))
    click.echo(f"written: {Path(cfg.out) / 'bench.json'}")
