"""`python -m benchmarks COMMAND`: the harnesses' command line (benchmarks/cli.py)."""

from benchmarks.cli import main

main()
