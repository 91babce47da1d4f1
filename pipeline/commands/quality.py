"""`saepipe quality`: ours and SAELens's SAEs trained on the same rows, compared (needs sae-lens)."""

from __future__ import annotations

import dataclasses

import click

from pipeline.commands.options import options
from pipeline.tools.quality import QualityConfig, compare_with_saelens, format_quality_table
from stages.train import TrainConfig


@click.command()
@click.argument("store")
@options(TrainConfig, "hook")
@options(QualityConfig, "archs")
@options(TrainConfig, "width")
@options(QualityConfig, "k")
@options(TrainConfig, "tokens", "batch_size", "lr")
@options(QualityConfig, "eval_tokens", "use_model", "interpretability", "absorption_words", "probe_data")
@options(QualityConfig, "dictionary_learning")
@options(TrainConfig, "out", out={"help": "folder for the runs, quality.json and quality.md"})
@options(TrainConfig, "device", "seed", "progress")
def quality(store: str, archs: str, k: int, **settings) -> None:
    """Train ours and SAELens's SAEs on the same rows and compare them (needs sae-lens)."""
    names = {field.name for field in dataclasses.fields(QualityConfig)}
    own = {name: settings.pop(name) for name in list(settings) if name in names}
    base = TrainConfig(store=store, **settings)
    rows = compare_with_saelens(base, QualityConfig(archs=archs, k=k, **own))
    click.echo(format_quality_table(rows))
