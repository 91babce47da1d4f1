"""Refuse a collect whose store cannot fit on its disk before the model runs: a --tokens with three zeros
too many would otherwise fill the disk hours later (or fail at once allocating a split of 10^10 contexts)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from stages.basics.errors import SaepipeError

FP16_BYTES = 2


def store_bytes(tokens: int, widths: list[int]) -> int:
    """At least what a store of `tokens` rows of these hook widths holds: its fp16 activations (token ids,
    statistics and metadata come on top)."""
    return tokens * sum(widths) * FP16_BYTES


def require_disk_room(out: Path, tokens: int, eval_fraction: float, hooks: list[str], widths: list[int]) -> None:
    """One line when the disk under `out` has less free space than the store's activations need (the
    held-out rows come on top of `tokens`). What `out` holds now counts as free: the collect replaces it."""
    rows = math.ceil(tokens / (1 - eval_fraction))
    folder = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(folder).free + _bytes_under(out)
    need = store_bytes(rows, widths)
    if need > free:
        what = (
            f"{len(hooks)} hooks {sum(widths):,} values wide in all" if len(hooks) > 1 else f"{sum(widths):,}-wide rows"
        )
        raise SaepipeError(
            f"--tokens {tokens:,} ({rows:,} rows with the held-out ones) of {what} need at least {_size(need)} on disk (2 bytes a value), more than "
            f"the {_size(free)} free at {folder}: lower --tokens, or choose an --out on a larger disk"
        )


def _bytes_under(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _size(n: int) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB"
