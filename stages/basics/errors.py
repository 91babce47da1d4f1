class SaepipeError(Exception):
    """A user-facing error: one line naming what is wrong and what to do. The CLI prints it and exits 2."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """`Type: first line of its message` (just `Type` when it has none), cut to `limit` characters: a
    library's exception as the cause inside one of our one-line errors."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def require(ok: bool, message: str) -> None:
    """Raise SaepipeError(message) unless `ok`: a setting's check in one line."""
    if not ok:
        raise SaepipeError(message)
