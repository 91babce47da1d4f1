"""`saepipe collect`: run the model once over the text and write a store; or grow one (--append)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from pipeline.commands.options import options
from stages.basics.errors import SaepipeError
from stages.basics.settings import settings_of
from stages.collect import CollectConfig, run_collect
from stages.collect.config import RUN_SETTINGS

# What decides a store's contents besides its size: an append takes all of it from the store.
STORE_SETTINGS = tuple(name for name in settings_of(CollectConfig) if name not in RUN_SETTINGS | {"tokens"})


@click.command()
@options(
    CollectConfig,
    "model", "dataset", "dataset_split", "text_column", "hooks", "tokens", "context_size", "out", "normalize",
    "eval_fraction", "batch_size", "device", "dtype", "seed", "drop_first", "exclude_special", "outlier_factor",
    "shuffle_buffer_rows", "chunk_rows", "shard_chunks", "warmup_rows", "nonfinite", "workers", "scheduler",
    out={"required": False},  # or --append STORE
)  # fmt: skip
@click.option(
    "--append",
    "append_to",
    type=click.Path(),
    default=None,
    metavar="STORE",
    help="grow the complete STORE to --tokens training tokens, with its own settings (instead of --out)",
)
@options(CollectConfig, "resume", "overwrite", "fsync", "progress")
@click.pass_context
def collect(ctx: click.Context, append_to: str | None, **values) -> None:
    """Run the model once over the text and write normalized fp16 activations to a Zarr store."""
    if append_to is not None:
        values["out"] = _append_target(ctx, append_to, values["out"])
    elif values["out"] is None:
        out = next(param for param in ctx.command.params if param.name == "out")
        raise click.MissingParameter(ctx=ctx, param=out, message="Or grow a complete store with --append STORE.")
    out = run_collect(CollectConfig(**values, append=append_to is not None))
    click.echo(f"store ready: {out}")


def _append_target(ctx: click.Context, store: str, out: str | None) -> str:
    """The store `collect --append` grows, after refusing what an append cannot take."""
    flags = {param.name: param.opts[0] for param in ctx.command.params}
    given = [flags[name] for name in STORE_SETTINGS if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        raise SaepipeError(f"--append grows the store with the settings it was collected with: drop {', '.join(given)}")
    if out is not None:
        raise SaepipeError("--append STORE names the store it grows: drop --out")
    if ctx.get_parameter_source("tokens") is ParameterSource.DEFAULT:
        raise SaepipeError("--append needs --tokens N: the training tokens the store should hold in all")
    return store
