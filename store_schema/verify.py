"""`saepipe store verify`: check every chunk of a store against the CRC32C written with it.

Each array's chunks are decoded through Zarr, whose crc32c codec compares the stored checksum with the
bytes; a chunk below the committed rows that has no file is damage too (collect writes every chunk).
Every bad chunk is named, not just the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import zarr
from tqdm import tqdm

from store_schema import schema
from store_schema.reader import ActivationStore, chunk_exists, is_checksum_error, is_checksummed


def _row_split(name: str) -> str | None:
    """The split whose committed rows bound this array's meaningful chunks (None: the whole array)."""
    first = name.split("/", 1)[0]
    return first if first in schema.SPLITS else None


@dataclass
class Verification:
    checked: int  # chunks decoded and compared with their checksum
    damaged: list[str]  # one line per chunk that fails its checksum or is missing
    unverifiable: list[str]  # arrays written without checksums (stores from before they were recorded)


def verify_store(store: ActivationStore, progress: bool = True) -> Verification:
    arrays = sorted((name, arr) for name, arr in store.group.members(max_depth=None) if isinstance(arr, zarr.Array))
    plan, problems, unverifiable = [], [], []
    for name, arr in arrays:
        if not is_checksummed(arr):
            unverifiable.append(name)
            continue
        split = _row_split(name)
        rows = arr.shape[0] if split is None else min(arr.shape[0], store.n_rows(split))
        plan += [(name, arr, i) for i in range(math.ceil(rows / arr.chunks[0]))]
    for name, arr, i in tqdm(plan, desc="verify", unit="chunk", disable=not progress):
        where = (i,) + (0,) * (arr.ndim - 1)
        if not chunk_exists(arr, where):
            problems.append(f"chunk {i} of {name} is missing")
            continue
        try:
            arr.get_block_selection(where)
        except ValueError as e:
            if not is_checksum_error(e):
                raise
            problems.append(f"chunk {i} of {name} fails its checksum")
    return Verification(len(plan), problems, unverifiable)
