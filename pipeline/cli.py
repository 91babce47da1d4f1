"""The `saepipe` command line: one click group whose commands live in pipeline/commands/, one module each.

Every user-facing error (SaepipeError, StoreError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading

import click

from pipeline.commands.collect import collect
from pipeline.commands.compare import compare
from pipeline.commands.eval_set import eval_set
from pipeline.commands.evaluate import eval_command
from pipeline.commands.export import export
from pipeline.commands.info import info
from pipeline.commands.prepare_model import prepare_model
from pipeline.commands.report import report
from pipeline.commands.store import store
from pipeline.commands.train import train
from stages import __version__
from stages.basics.errors import SaepipeError
from store_schema.schema import StoreError

EXIT_USER_ERROR = 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's convention: 130, 143

# What a command stopped part-way keeps, and how to go on. Every writer commits atomically, so nothing is
# ever half-written.
_AFTER_INTERRUPT = {
    "collect": "the store keeps every committed block; run the same command again to resume it",
    "train": "the run keeps its last checkpoint; run the same command with --resume to continue it",
}


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


class SaepipeGroup(click.Group):
    """Turns the project's user-facing errors into one line on stderr and exit code 2, and Ctrl-C or
    SIGTERM into one line saying what was kept (exit 130 or 143)."""

    def invoke(self, ctx: click.Context):
        in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _stopped(ctx, "interrupted", EXIT_SIGINT)
        except _Terminated:
            _stopped(ctx, "terminated (SIGTERM)", EXIT_SIGTERM)
        except (SaepipeError, StoreError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
                click.echo(
                    f"error: cannot write {e.filename} ({e.strerror}): choose a writable --out, or copy what "
                    f"you are working on somewhere writable",
                    err=True,
                )
                sys.exit(EXIT_USER_ERROR)
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
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)


def _stopped(ctx: click.Context, how: str, code: int) -> None:
    kept = _AFTER_INTERRUPT.get(ctx.invoked_subcommand, "nothing is left half-written; run the same command again")
    click.echo(f"{how}: {kept}", err=True)
    sys.exit(code)


@click.group(cls=SaepipeGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="saepipe")
def main() -> None:
    """Collect a model's activations once into a Zarr store, then train and evaluate SAEs from it."""


for command in (collect, train, eval_command, eval_set, report, compare, export, info, store, prepare_model):
    main.add_command(command)


if __name__ == "__main__":
    main()
