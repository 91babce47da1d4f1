class SaepipeError(Exception):
    """A user-facing error: one line naming what is wrong and what to do. The CLI prints it and exits 2."""
