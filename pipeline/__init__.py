"""What the user touches: the `saepipe` CLI and the tools built on the stages (bench, quality, soak)."""

from stages import __version__

__all__ = ["__version__"]
