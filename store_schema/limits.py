"""Refusing a store whose metadata describes more than this machine can hold, before any allocation is
sized by it: a damaged or hostile header could otherwise ask a reader for terabytes in one call."""

from __future__ import annotations

from pathlib import Path

import zarr

from store_schema import schema
from store_schema.header import StoreHeader

# A reader allocates at most one of these at a time; each must leave room for the rest of the process.
LARGEST_SHARE_OF_MEMORY = 0.25


def available_host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits_in_memory(group: zarr.Group, header: StoreHeader, memory_bytes: int | None = None) -> None:
    """Raise a one-line StoreError when something a reader or a resumed collect allocates whole (a chunk
    of rows or tokens, the split of every context, the skipped contexts, a running sum) would take more
    than LARGEST_SHARE_OF_MEMORY of `memory_bytes` (the memory available now)."""
    memory = available_host_memory_bytes() if memory_bytes is None else memory_bytes
    d = max([header.d_model] + [header.width(hook) for hook in header.hooks])
    tokens, split = group[schema.TOKENS], group[schema.CONTEXT_SPLIT]
    sizes = {
        f"a chunk of rows ({header.chunk_rows:,} x {d:,} fp16)": header.chunk_rows * d * 2,
        f"a chunk of tokens {tuple(tokens.chunks)}": _product(tokens.chunks) * 4,
        f"the split of its {split.shape[0]:,} contexts": _product(split.shape) * 5,  # int8, and 4 bytes per context
        f"its {header.skipped_count:,} skipped contexts": header.skipped_count * 8,
        f"a running sum of width {d:,}": schema.RUNNING_SUM_SLOTS * d * 8,
    }
    what, largest = max(sizes.items(), key=lambda item: item[1])
    if largest > LARGEST_SHARE_OF_MEMORY * memory:
        raise schema.damaged(
            f"its metadata describes {what}: {largest / 2**30:,.1f} GiB in one piece, more than this machine "
            f"can hold ({memory / 2**30:,.1f} GiB available)"
        )


# Saepipe's root metadata stays under 64 KiB (schema version 2; version 1 stores grew to a few MB): a root
# zarr.json far larger is not a store of ours, and parsing it would take its size in memory many times.
MAX_ROOT_METADATA_BYTES = 64 << 20


def check_root_metadata_size(location: str) -> None:
    """Refuse a local store whose root zarr.json is too large to be one, before it is read."""
    root = Path(location) / "zarr.json"
    if "://" in location or not root.is_file():
        return
    size = root.stat().st_size
    if size > MAX_ROOT_METADATA_BYTES:
        raise schema.StoreError(
            f"{root} is {size / 2**20:,.0f} MiB, far more than a store's root metadata (at most "
            f"{MAX_ROOT_METADATA_BYTES >> 20} MiB): it is not a saepipe store, or a damaged one; it was not read"
        )


def _product(shape) -> int:
    total = 1
    for n in shape:
        total *= int(n)
    return total
