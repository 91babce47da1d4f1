"""What the user touches: the `saepipe` CLI, configuration, host models, text sources, run folders."""

__version__ = "0.1.0"
