"""`saepipe report`: one self-contained HTML page (and PNGs) for evaluated runs."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.commands.options import options
from stages.report.build import ReportOptions, build_report, report_summary
from stages.report.latents import BrowseOptions


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@options(ReportOptions, "out")
@options(BrowseOptions, "named", "n_top", "n_random", "n_contexts", "max_rows", "seed")
@options(ReportOptions, "use_model", "device")
@options(BrowseOptions, "progress")
def report(runs: tuple[str, ...], out: str, use_model: bool, device: str, **browse) -> None:
    """Write a self-contained HTML report (OUT/index.html, plus the plots as PNG files) for evaluated runs:
    training curves, feature density, the L0 frontier, eval metrics and a latent browser."""
    started = time.perf_counter()
    options = ReportOptions(list(runs), Path(out), BrowseOptions(**browse).validate(), use_model, device)
    click.echo(report_summary(build_report(options), started))
