"""`saepipe quality-transcoder`: our transcoder and sparsify's trained on the same rows, compared (needs
eai-sparsify)."""

from __future__ import annotations

import click

from pipeline.commands.options import options
from pipeline.tools.quality_transcoder import TranscoderQualityConfig, compare_with_sparsify, format_table
from stages.train import TrainConfig


@click.command("quality-transcoder")
@click.argument("store")
@options(TrainConfig, "in_hook", "out_hook", "width")
@options(TranscoderQualityConfig, "k", "skip")
@options(TrainConfig, "tokens", "batch_size", "lr")
@options(TranscoderQualityConfig, "sparsify_lr", "eval_tokens", "use_model")
@options(TrainConfig, "out", out={"help": "folder for both transcoders, quality_transcoder.json and .md"})
@options(TrainConfig, "device", "seed", "progress")
def quality_transcoder(
    store: str, k: int, skip: bool, sparsify_lr: float | None, eval_tokens: int, use_model: bool, **train
) -> None:
    """Train our transcoder and sparsify's (its transcode mode) on the same rows and compare them (needs
    eai-sparsify). --lr is ours; sparsify trains with its own optimizer and lr (--sparsify-lr)."""
    base = TrainConfig(store=store, arch="transcoder", **train)
    qcfg = TranscoderQualityConfig(
        k=k, skip=skip, sparsify_lr=sparsify_lr, eval_tokens=eval_tokens, use_model=use_model
    )
    click.echo(format_table(compare_with_sparsify(base, qcfg)))
