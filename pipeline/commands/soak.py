"""`saepipe soak`: a store under load (training, readers, an appender) for a bounded time."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.commands.options import options
from pipeline.tools.soak import SoakConfig, run_soak
from stages.basics.errors import SaepipeError


@click.command()
@options(SoakConfig, "out", "seconds", "model", "readers")
def soak(**values) -> None:
    """Train from a store while other processes read it and one appends to it; report throughput and
    whether every reader saw consistent data (a benchmark; writes OUT/soak.json)."""
    cfg = SoakConfig(**values)
    report = run_soak(cfg)
    click.echo(json.dumps(report, indent=2))
    if not report["consistent"]:
        raise SaepipeError(f"the soak found inconsistent data or a damaged store: see {Path(cfg.out) / 'soak.json'}")
