"""`saepipe info`: describe a store or a run folder."""

from __future__ import annotations

import json

import click

from pipeline.describe import describe, summary_text


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "print_json", is_flag=True, help="print the raw metadata as JSON")
def info(path: str, print_json: bool) -> None:
    """Describe a store or a run folder."""
    summary = describe(path)
    click.echo(json.dumps(summary, indent=2) if print_json else summary_text(summary))
