"""The `saepipe` command line run in-process (click's CliRunner), and the tiny random model's collect that
the CLI tests start from."""

import click
from click.testing import CliRunner, Result

from pipeline.cli import main

HOOK = "blocks.2.hook_resid_post"  # the hook `collect_args` collects


def run(*args, catch_exceptions: bool = False, cli: click.Group = main) -> Result:
    """`saepipe ARGS`, each argument passed through str() (paths and numbers as they are). An exception that
    the command does not turn into an error line propagates with its traceback; with `catch_exceptions`,
    click catches it instead (exit code 1, `result.exception`). `cli`: another command line, such as the
    harnesses' (`python -m benchmarks`, benchmarks.cli.main)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def run_catching(*args, cli: click.Group = main) -> Result:
    """`run` with click catching any exception: exit code 1 and `result.exception`, never a raise."""
    return run(*args, catch_exceptions=True, cli=cli)


def run_ok(*args, catch_exceptions: bool = False) -> Result:
    """`run` that must succeed: exit code 0, or the test fails with the command's output."""
    result = run(*args, catch_exceptions=catch_exceptions)
    assert result.exit_code == 0, result.output
    return result


def expect_error(result: Result, *fragments: str) -> None:
    """The command was refused as the CLI refuses: exit code 2 and a last line `error: ...` holding every
    fragment."""
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, line


def collect_args(
    tokens: int, *, warmup_rows: int = 1000, eval_fraction: float | None = None, shard_chunks: int = 1
) -> list[str]:
    """`saepipe collect` of the tiny random model at HOOK, in contexts of 32 tokens, 512-row chunks (a
    file each, unless `shard_chunks`: the tests that damage a store name its chunk files) and a 1,000-row
    shuffle buffer, without a progress bar: add `--out`. The first three are `collect --model
    tiny-random`."""
    args = [
        "collect",
        "--model",
        "tiny-random",
        "--hook",
        HOOK,
        "--tokens",
        str(tokens),
        "--context-size",
        "32",
        "--shuffle-buffer-rows",
        "1000",
        "--chunk-rows",
        "512",
        "--shard-chunks",
        str(shard_chunks),
        "--warmup-rows",
        str(warmup_rows),
    ]
    if eval_fraction is not None:
        args += ["--eval-fraction", str(eval_fraction)]
    return args + ["--no-progress"]
