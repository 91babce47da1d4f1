"""`saepipe eval-set`: per-layer transcoders evaluated together, all spliced into the model at once."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.commands.options import options
from stages.evaluate.transcoder_set import SET_EVAL, EvalSetConfig, format_set_table, run_eval_set


@click.command(name="eval-set")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@options(EvalSetConfig, "out", "store", "model", "tokens", "splice_from", "device", "progress")
def eval_set(runs: tuple[str, ...], **values) -> None:
    """Evaluate per-layer transcoders together (RUNS: one run folder per layer): each layer's fve and L0,
    and CE loss and KL with every one spliced in for its MLP output at once. Definitions: docs/metrics.md."""
    result = run_eval_set(EvalSetConfig(runs, **values))
    click.echo(format_set_table(result))
    click.echo(f"written: {Path(values['out']) / SET_EVAL}")
