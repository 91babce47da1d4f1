"""The click commands of `saepipe`, one module each (registered in pipeline/cli.py)."""
