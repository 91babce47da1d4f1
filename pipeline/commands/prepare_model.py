"""`saepipe prepare-model`: convert the offline default model once into the user cache."""

from __future__ import annotations

import click

from stages.basics.defaults import DEFAULT_MODEL
from stages.basics.errors import SaepipeError
from stages.host_model import prepare_default_model


@click.command(name="prepare-model")
@click.argument("name", default=DEFAULT_MODEL)
def prepare_model(name: str) -> None:
    """Convert the offline default model once into the user cache (done by `make setup`)."""
    if name != DEFAULT_MODEL:
        raise SaepipeError(f"only the offline default {DEFAULT_MODEL} needs preparing; other models load directly")
    click.echo(f"model ready: {prepare_default_model()}")
