"""`saepipe store info|copy|verify`: look after a store."""

from __future__ import annotations

import inspect

import click

from pipeline.commands.info import info
from stages.basics.errors import SaepipeError
from store_schema.copy import copy_store
from store_schema.reader import open_store
from store_schema.verify import verify_store


@click.group()
def store() -> None:
    """Look after a store: describe it, copy it, verify its checksums."""


# `saepipe store info` is `saepipe info` itself (one command, listed in both places).
store.add_command(info, name="info")


@store.command(name="copy")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--threads",
    type=int,
    default=inspect.signature(copy_store).parameters["threads"].default,
    help="files copied at once",
)
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="no progress bars")
def store_copy(src: str, dst: str, threads: int, progress: bool) -> None:
    """Copy a complete store to or from object storage (any fsspec URL or path); run it again to resume."""
    done = copy_store(src, dst, threads=threads, progress=progress)
    click.echo(
        f"copied {done['files_copied']:,} files ({done['bytes_copied'] / 1e6:,.1f} MB), "
        f"{done['files_skipped']:,} already there: {dst}"
    )


@store.command(name="verify")
@click.argument("path", type=click.Path())
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="no progress bars")
def store_verify(path: str, progress: bool) -> None:
    """Check every chunk against the CRC32C written with it, every stored row for NaN and inf, and the tokens
    against their recorded fingerprint; name every damaged or missing chunk."""
    opened = open_store(path)
    result = verify_store(opened, progress=progress)
    for name in result.unverifiable:
        click.echo(f"warning: {name} has no checksums (written before saepipe recorded them): not verified", err=True)
    for line in result.damaged:
        click.echo(line)
    for name in result.foreign:
        click.echo(f"{name} is not part of the store")
    if result.damaged:
        raise SaepipeError(
            f"{len(result.damaged)} damaged chunk(s) in {path} (listed above): the store cannot be "
            f"trusted; collect it again, or copy it again from a good replica"
        )
    if result.foreign:
        raise SaepipeError(
            f"{len(result.foreign)} file(s) in {path} are not part of the store (listed above): remove them "
            f"(a store holds only its own files), or copy the store again"
        )
    click.echo(f"ok: {result.checked:,} chunks match their checksums; every row is finite and the tokens match")
    if not opened.complete:  # what is committed is sound, but the store is not one to train on yet
        done, planned = opened.n_rows("train"), opened.header.planned_rows["train"]
        click.echo(
            f"note: the store is incomplete ({done:,} of {planned:,} training rows committed): finish it by "
            f"re-running the same `saepipe collect` command",
            err=True,
        )
