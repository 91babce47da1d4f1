"""The `report` and `compare` click commands (registered on the `saepipe` group in pipeline/cli.py)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from stages.basics.errors import SaepipeError


def _positive(name: str, value: int, minimum: int = 0) -> None:
    if value < minimum:
        raise SaepipeError(f"{name} must be at least {minimum}, got {value}")


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out", default="report", show_default=True, type=click.Path(), help="folder for index.html and the PNG files"
)
@click.option("--latents", default=None, metavar="I,J,...", help="latents to show in every run's browser, e.g. 12,345")
@click.option("--top", "n_top", type=int, default=8, show_default=True, help="most frequently firing latents per run")
@click.option(
    "--random",
    "n_random",
    type=int,
    default=8,
    show_default=True,
    help="randomly chosen latents per run (among those that fire)",
)
@click.option(
    "--contexts",
    "n_contexts",
    type=int,
    default=10,
    show_default=True,
    help="top-activating held-out contexts per latent",
)
@click.option(
    "--max-rows", type=int, default=200_000, show_default=True, help="held-out rows scanned for the latent browser"
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random latents")
@click.option(
    "--no-model", is_flag=True, help="do not load the model: tokens shown as ids, no promoted/suppressed output tokens"
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--no-progress", is_flag=True)
def report(
    runs: tuple[str, ...],
    out: str,
    latents: str | None,
    n_top: int,
    n_random: int,
    n_contexts: int,
    max_rows: int,
    seed: int,
    no_model: bool,
    device: str,
    no_progress: bool,
) -> None:
    """Write a self-contained HTML report (OUT/index.html, plus the plots as PNG files) for evaluated runs:
    training curves, feature density, the L0 frontier, eval metrics and a latent browser."""
    from stages.report.build import ReportOptions, build_report, report_summary
    from stages.report.latents import BrowseOptions, parse_latents

    for name, value, minimum in (
        ("--top", n_top, 0),
        ("--random", n_random, 0),
        ("--contexts", n_contexts, 1),
        ("--max-rows", max_rows, 1),
    ):
        _positive(name, value, minimum)
    started = time.perf_counter()
    options = BrowseOptions(
        parse_latents(latents), n_top, n_random, n_contexts, max_rows=max_rows, seed=seed, progress=not no_progress
    )
    index = build_report(ReportOptions(list(runs), Path(out), options, use_model=not no_model, device=device))
    click.echo(report_summary(index, started))


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON (one object per run)")
def compare(runs: tuple[str, ...], as_json: bool) -> None:
    """Print the eval metrics of several runs side by side (rows: metrics, columns: runs)."""
    from stages.report.compare import as_json as to_json
    from stages.report.compare import format_table
    from stages.report.runs import load_runs

    loaded = load_runs(list(runs))
    click.echo(to_json(loaded) if as_json else format_table(loaded))
