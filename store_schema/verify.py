"""`saepipe store verify`: check every chunk of a store against the CRC32C written with it, every stored
row for finiteness, and the tokens against the fingerprint recorded when they were written.

Each array's chunks are decoded through Zarr, whose crc32c codec compares the stored checksum with the
bytes (and, for a chunk of a sharded array, its shard's index with the index's); a chunk below the
committed rows that has no file, or that its shard's index does not hold, is damage too (collect writes
every chunk).
A checksum says a chunk holds what was written; it cannot tell that what was written is usable. So the
committed rows of every activation chunk are checked for NaN and inf (a collect never stores them: it
leaves such contexts out), and the token chunks, decoded in order, must give the recorded fingerprint
(a context changed or reordered and checksummed anew would otherwise make eval replay the wrong text).
One chunk is held at a time. Every problem is named, not just the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from store_schema import schema
from store_schema.chunk_files import is_checksummed
from store_schema.reader import ActivationStore, chunk_exists, is_checksum_error


def _row_split(name: str) -> str | None:
    """The split whose committed rows bound this array's meaningful chunks (None: the whole array)."""
    first = name.split("/", 1)[0]
    return first if first in schema.SPLITS else None


@dataclass
class Verification:
    checked: int  # chunks decoded and compared with their checksum
    damaged: list[str]  # one line per chunk that fails its checksum or is missing
    unverifiable: list[str]  # arrays written without checksums (stores from before they were recorded)
    foreign: list[str]  # files under the store that are not part of it


def verify_store(store: ActivationStore, progress: bool = True) -> Verification:
    # the arrays the header names: walking the group would also open whatever else lies in the folder
    arrays = sorted((name, store.group[name]) for name in schema.array_names(store.header))
    plan, problems, unverifiable = [], [], []
    for name, arr in arrays:
        if not is_checksummed(arr):
            unverifiable.append(name)
            continue
        split = _row_split(name)
        rows = arr.shape[0] if split is None else min(arr.shape[0], store.n_rows(split))
        plan += [(name, arr, i) for i in range(math.ceil(rows / arr.chunks[0]))]
    tokens = _TokensCheck(store)
    for name, arr, i in tqdm(plan, desc="verify", unit="chunk", disable=not progress):
        where = (i,) + (0,) * (arr.ndim - 1)
        if not chunk_exists(arr, where):
            problems.append(f"chunk {i} of {name} is missing")
            tokens.broken |= name == schema.TOKENS
            continue
        try:
            block = _decode_chunk(arr, where)
        except ValueError as e:
            if not is_checksum_error(e):
                raise
            problems.append(f"chunk {i} of {name} fails its checksum")
            tokens.broken |= name == schema.TOKENS
            continue
        split = _row_split(name)
        if split is not None and arr.dtype.kind == "f":
            committed = block[: max(0, store.n_rows(split) - i * arr.chunks[0])]
            bad = int(committed.size - np.isfinite(committed).sum())
            if bad:
                problems.append(f"chunk {i} of {name} holds {bad:,} non-finite values (NaN or inf) in committed rows")
        if name == schema.TOKENS:
            tokens.add(i * arr.chunks[0], block)
    problems += tokens.problems()
    return Verification(len(plan), problems, unverifiable, foreign_files(store))


def _decode_chunk(arr, where: tuple[int, ...]) -> np.ndarray:
    """The chunk at `where` (chunked along the rows only) as Zarr decodes it: a block of the array's grid,
    or, when the array is sharded, the rows of one inner chunk (Zarr's blocks are then whole shards), its
    shard's index checked on the way."""
    if arr.shards is None:
        return arr.get_block_selection(where)
    rows = arr.chunks[0]
    return arr[where[0] * rows : (where[0] + 1) * rows]


class _TokensCheck:
    """The tokens' fingerprint, fed their chunks in order: that of the contexts the header counts (an
    append in progress writes more after them), compared with the one recorded when they were written."""

    def __init__(self, store: ActivationStore):
        header = store.header
        self.expected = header.tokens_fingerprint
        self.n = header.split.n_contexts if header.split.n_train_contexts is not None else store.tokens.shape[0]
        self.fingerprint, self.next, self.broken = schema.TokensFingerprint(), 0, False

    def add(self, first: int, block: np.ndarray) -> None:
        if first != self.next:  # a chunk before it was missing or damaged: already reported
            self.broken = True
            return
        self.fingerprint.update(block[: max(0, self.n - first)])
        self.next = first + len(block)

    def problems(self) -> list[str]:
        if self.expected is None or self.broken:
            return []
        found = self.fingerprint.hexdigest()
        if found == self.expected:
            return []
        return [
            f"{schema.TOKENS} does not match the fingerprint recorded when it was written ({found}, recorded "
            f"{self.expected}): contexts were changed, reordered or replaced"
        ]


def foreign_files(store: ActivationStore) -> list[str]:
    """Files under the store that none of its arrays owns (a store copied into it, stray files): the
    header names every array, and an array owns its zarr.json and the files of its grid (chunks, or the
    shards of a sharded array)."""
    from store_schema.copy import store_filesystem  # copy imports the reader too: keep the graph acyclic

    fs, root = store_filesystem(store.location)
    owned = {"zarr.json"}
    grids = {}
    for name in schema.array_names(store.header):
        arr = store.group[name]
        parts = name.split("/")
        owned |= {"/".join(parts[:i] + ["zarr.json"]) for i in range(1, len(parts) + 1)}  # its groups' too
        grids[name] = [math.ceil(n / c) for n, c in zip(arr.shape, arr.shards or arr.chunks)]
    found = []
    for path in sorted(fs.find(root)):
        relative = path[len(root.rstrip("/")) + 1 :]
        if relative in owned or _is_chunk_of(relative, grids):
            continue
        found.append(relative)
    return found


def _is_chunk_of(relative: str, grids: dict[str, list[int]]) -> bool:
    """Whether `relative` is `ARRAY/c/i/j...` with indices inside ARRAY's chunk grid."""
    array, _, key = relative.partition("/c/")
    grid = grids.get(array)
    if grid is None or not key:
        return False
    indices = key.split("/")
    return len(indices) == len(grid) and all(i.isdigit() and int(i) < n for i, n in zip(indices, grid))
