"""`saepipe eval`: a trained SAE on held-out rows; with the model, CE loss, KL and ablation sparsity."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.commands.options import options
from stages.evaluate import EvalConfig, format_eval_table, run_eval


@click.command(name="eval")
@click.argument("run", type=click.Path())
@options(
    EvalConfig,
    "store",
    "model",
    "tokens",
    "use_model",
    "splice_from",
    "ablation_contexts",
    "suite",
    "external",
    "device",
)
@options(EvalConfig, "probe_data", "probe_text_column", "probe_label_column", "absorption_words", "truth", "progress")
def eval_command(run: str, **values) -> None:
    """Evaluate a trained SAE (RUN: its run folder) on held-out rows; with the model, CE loss, KL and
    ablation sparsity with it spliced in. Definitions: docs/metrics.md."""
    result = run_eval(EvalConfig(run, **values))
    click.echo(format_eval_table(result))
    click.echo(f"written: {Path(run) / 'eval.json'}")
