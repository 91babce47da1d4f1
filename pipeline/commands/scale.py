"""`saepipe scale`: a store at scale, measured on this machine (docs/scale.md); writes OUT/scale.json."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.commands.options import options
from pipeline.tools.scale import ScaleConfig, format_scale_table, run_scale


@click.command()
@options(ScaleConfig, "out", "collect_tokens", "big_store_gb", "s3_latency_ms", "model", "collect_hook", "only")
@options(ScaleConfig, "progress")
def scale(**values) -> None:
    """Measure collect at 10M and 100M tokens, a store bigger than memory, streaming from S3 (moto, with
    injected latency) and the cost of durable commits; writes OUT/scale.json. Needs about 40 GB of free
    disk under OUT and takes about 12 minutes on 2 cores (docs/scale.md)."""
    cfg = ScaleConfig(**values)
    result = run_scale(cfg)
    click.echo(format_scale_table(result))
    click.echo(f"written: {Path(cfg.out) / 'scale.json'}")
