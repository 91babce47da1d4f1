"""The `saepipe` command line: one click group whose commands live in pipeline/commands/, one module each.

Every user-facing error (SaepipeError, StoreError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import sys

import click

from pipeline.commands.bench import bench
from pipeline.commands.collect import collect
from pipeline.commands.compare import compare
from pipeline.commands.evaluate import eval_command
from pipeline.commands.info import info
from pipeline.commands.prepare_model import prepare_model
from pipeline.commands.quality import quality
from pipeline.commands.report import report
from pipeline.commands.scale import scale
from pipeline.commands.soak import soak
from pipeline.commands.store import store
from pipeline.commands.train import train
from stages import __version__
from stages.basics.errors import SaepipeError
from store_schema.schema import StoreError

EXIT_USER_ERROR = 2


class SaepipeGroup(click.Group):
    """Turns the project's user-facing errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (SaepipeError, StoreError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Every writer commits atomically, so what was committed before the disk filled is intact.
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(
                f"error: no space left on device{where}: free space, then re-run the same command "
                f"(collect resumes where it stopped; train resumes with --resume)",
                err=True,
            )
            sys.exit(EXIT_USER_ERROR)


@click.group(cls=SaepipeGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="saepipe")
def main() -> None:
    """Collect a model's activations once into a Zarr store, then train and evaluate SAEs from it."""


for command in (collect, train, eval_command, report, compare, quality, bench, scale, soak, info, store, prepare_model):
    main.add_command(command)


if __name__ == "__main__":
    main()
