"""`saepipe compare`: the eval metrics of several runs side by side."""

from __future__ import annotations

import click

from stages.report.compare import as_json, format_comparison
from stages.report.runs import load_runs


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--json", "print_json", is_flag=True, help="print the metrics as JSON (one object per run)")
def compare(runs: tuple[str, ...], print_json: bool) -> None:
    """Print the eval metrics of several runs side by side (rows: metrics, columns: runs)."""
    loaded = load_runs(list(runs))
    click.echo(as_json(loaded) if print_json else format_comparison(loaded))
