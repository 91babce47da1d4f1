"""Names, version and invariants of the activation store (schema version 2; version 1 still reads). SPEC.md
is the prose twin."""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING

import numpy as np
from zarr.codecs import Crc32cCodec

if TYPE_CHECKING:  # the header module imports this one
    from store_schema.header import StoreHeader

SCHEMA_NAME = "saepipe.activation-store"
SCHEMA_VERSION = 4
# Version 2 keeps the root metadata small whatever the corpus, width and hooks: the running statistics'
# sum vectors and the skipped contexts live in arrays, not in the attributes rewritten at every commit.
FIRST_SMALL_METADATA_VERSION = 2
# Version 3 adds `hook_widths`, for hooks whose rows are not d_model wide (an MLP's hidden activations,
# attention's per-head outputs). A store whose hooks are all d_model wide is still written as version 2,
# so every saepipe that reads version 2 reads it.
FIRST_HOOK_WIDTHS_VERSION = 3
# Version 4 adds sharded row arrays (`layout.shard_rows`: many chunks to a file) and commits that end on
# shard boundaries, which can leave the head of a block committed before the block (a split's
# `rows_in_blocks`). A store written without shards is still written as version 2 or 3.
FIRST_SHARDED_VERSION = 4
# The oldest version this saepipe continues or grows (a version 1 store only reads).
FIRST_WRITABLE_VERSION = 2
ATTRS_KEY = "saepipe"  # every attribute of ours lives under this one root attribute

SPLITS = ("train", "eval")
SPLIT_CODES = {"train": 0, "eval": 1}

TOKENS = "tokens"
CONTEXT_SPLIT = "context_split"
SKIPPED_CONTEXTS = "skipped_contexts"  # int64, contexts left out for non-finite activations, in commit order
SKIPPED_CHUNK = 4096
TOKENS_CHUNK_CONTEXTS = 1024
# Each hook's running sum (float64 [d]) of each split is kept in one of a few slots: a commit writes the new
# sum to a slot no attribute names (neither the store's nor a running append's) and then names it, so the
# sum readers see is never the one being written.
RUNNING_SUM_SLOTS = 4


# Integrity: every chunk of every array ends with the CRC32C of its bytes (Zarr's crc32c codec, so any
# Zarr reader verifies it), and every chunk of the row arrays is written even when it holds only the
# fill value, so a missing chunk file below the committed rows is damage, never "all zeros".
EVERY_CHUNK_WRITTEN_CONFIG = {"array.write_empty_chunks": True}


def checksummed(*codecs) -> tuple:
    """The bytes-to-bytes codecs of an array: `codecs` (e.g. compression), then the chunk's CRC32C."""
    return (*codecs, Crc32cCodec())


class StoreError(Exception):
    """A store cannot be opened or used as asked; the message says why and what to do."""


def damaged(what: str) -> StoreError:
    """The one error for a damaged store, whatever part of it is damaged: `what`, then what to do."""
    return StoreError(
        f"{what}: the store is damaged; run `saepipe store verify` to list every damaged part, then copy the "
        f"store again from its source, or collect it again"
    )


def acts_path(split: str, hook: str) -> str:
    return f"{split}/acts/{hook}"


def row_stats_path(split: str, hook: str) -> str:
    return f"{split}/row_stats/{hook}"


def row_context_path(split: str) -> str:
    return f"{split}/row_context"


def row_position_path(split: str) -> str:
    return f"{split}/row_position"


def norm_mean_path(hook: str) -> str:
    return f"normalization/{hook}/mean"


def running_sum_path(split: str, hook: str) -> str:
    return f"running_sums/{split}/{hook}"


def row_array_names(header: StoreHeader, split: str) -> list[str]:
    """The arrays holding one row per stored position of `split`."""
    names = [row_context_path(split), row_position_path(split)] + [acts_path(split, h) for h in header.hooks]
    if header.normalization_mode == "token":
        names += [row_stats_path(split, h) for h in header.hooks]
    return names


def array_names(header: StoreHeader) -> list[str]:
    """Every array a store with this header holds."""
    names = [TOKENS, CONTEXT_SPLIT]
    for split in SPLITS:
        names += row_array_names(header, split)
    if header.small_metadata:
        names += [SKIPPED_CONTEXTS] + [running_sum_path(split, hook) for split in SPLITS for hook in header.hooks]
    for hook in header.hooks:
        norm = header.normalization_attrs(hook)
        if norm is not None and norm["mode"] == "center-scale":
            names.append(norm_mean_path(hook))
    return names


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokens_fingerprint(tokens: np.ndarray) -> str:
    fingerprint = TokensFingerprint()
    fingerprint.update(tokens)
    return fingerprint.hexdigest()


class TokensFingerprint:
    """The fingerprint of a tokens array, fed its contexts in order in pieces of any size."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, tokens: np.ndarray) -> None:
        self._hash.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


def new_header(
    *,
    writer: str,
    config_fingerprint: str,
    collect_config: dict,
    model: dict,
    text_source: dict,
    tokenizer: dict,
    context_size: int,
    dropped_positions: list[int],
    excluded_tokens: list[int],
    outlier_factor: float | None,
    hooks: list[str],
    d_model: int,
    token_budget: int,
    shuffle: dict,
    split: dict,
    normalization_mode: str,
    warmup_rows: int,
    nonfinite_policy: str,
    hook_widths: dict[str, int] | None = None,
) -> dict:
    """The header of a new store, every field SPEC.md describes in its order (StoreWriter.create adds the
    layout, progress and statistics): the one place a store's header is assembled, whoever writes it.
    `hook_widths`: the row width of each hook (default d_model); only widths other than d_model are kept."""
    widths = {hook: int(w) for hook, w in (hook_widths or {}).items() if int(w) != d_model}
    header = {
        "schema": SCHEMA_NAME,
        "schema_version": FIRST_HOOK_WIDTHS_VERSION if widths else FIRST_HOOK_WIDTHS_VERSION - 1,
        "writer": writer,
        "config_fingerprint": config_fingerprint,
        "collect_config": collect_config,
        "model": model,
        "text_source": text_source,
        "tokenizer": tokenizer,
        "context_size": context_size,
        "dropped_positions": dropped_positions,
        "excluded_tokens": excluded_tokens,
        "outlier_factor": outlier_factor,
        "hooks": hooks,
        "d_model": d_model,
        "token_budget": token_budget,
        "shuffle": shuffle,
        "split": split,
        "normalization_mode": normalization_mode,
        "warmup_rows": warmup_rows,
        "nonfinite_policy": nonfinite_policy,
    }
    if widths:
        header["hook_widths"] = widths
    return header


STATS_ROWS = 256  # rows RunningStats.update converts to float64 at a time (256 x d 576: 1.2 MB)


def _max_abs(rows: np.ndarray, converted: np.ndarray) -> float:
    """max |x| of a few rows: fp16 ones from their bits (with the sign bit cleared, a larger magnitude has a
    larger pattern: an integer max, ten times faster than numpy's fp16 abs), others from their float copy."""
    if rows.dtype == np.float16:
        bits = np.uint16((rows.view(np.uint16) & 0x7FFF).max())
        return float(bits.view(np.float16))
    return float(np.abs(converted).max())


class RunningStats:
    """Statistics over every row written for one hook and split, accumulated in float64.

    Rewritten with each commit (the scalars in the attributes, the sum vector in a slot of its array), so a
    resumed collect continues the very same sums and ends bit-identical to an uninterrupted one.
    """

    def __init__(
        self,
        d: int,
        count: int = 0,
        total=None,
        sum_sq_norm: float = 0.0,
        max_abs: float = 0.0,
        nonfinite_values: int = 0,
        nonfinite_contexts: int = 0,
        outlier_rows: int = 0,
    ):
        self.count = count
        self.total = np.zeros(d, np.float64) if total is None else np.asarray(total, np.float64)
        self.sum_sq_norm = sum_sq_norm
        self.max_abs = max_abs
        self.nonfinite_values = nonfinite_values
        self.nonfinite_contexts = nonfinite_contexts
        self.outlier_rows = outlier_rows  # rows above the normalization's max_norm, not stored

    def update(self, rows: np.ndarray, fast: bool = False) -> None:
        """Add written (normalized, fp16) rows [n, d]. `fast`: in float32 (the sum of squares then carries
        float32 rounding), for generated stores written at disk speed; a collect never uses it, its
        statistics are float64 sums.

        The rows are summed STATS_ROWS at a time through one small float64 buffer that stays in cache: a
        float64 copy of the whole block (8 bytes a value, freshly faulted in) made this 13 times slower,
        and collect's own ceiling was this. The order of the additions is fixed by STATS_ROWS alone, so
        every machine, a resume and a dask worker sum a block the same way."""
        n, d = rows.shape
        self.count += n
        if n == 0:
            return
        buffer = np.empty((min(n, STATS_ROWS), d), np.float32 if fast else np.float64)
        total, sum_sq, max_abs = np.zeros(d, np.float64), 0.0, 0.0
        for start in range(0, n, STATS_ROWS):
            x = buffer[: min(STATS_ROWS, n - start)]
            np.copyto(x, rows[start : start + STATS_ROWS])
            total += x.sum(axis=0, dtype=np.float64)
            sum_sq += float(np.einsum("ij,ij->", x, x))
            max_abs = max(max_abs, _max_abs(rows[start : start + STATS_ROWS], x))
        self.total += total
        self.sum_sq_norm += sum_sq
        self.max_abs = max(self.max_abs, max_abs)

    def merge(self, block: RunningStats) -> None:
        """Fold a later block's own statistics in. Merging each block's statistics in block order gives
        the very float64 sums of `update` over the same blocks in turn (each sum is added once per block
        either way), so blocks summarized apart (on dask workers) and merged in order end bit-identical
        to one process updating them."""
        self.count += block.count
        self.total += block.total
        self.sum_sq_norm += block.sum_sq_norm
        self.max_abs = max(self.max_abs, block.max_abs)
        self.nonfinite_values += block.nonfinite_values
        self.nonfinite_contexts += block.nonfinite_contexts
        self.outlier_rows += block.outlier_rows

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_sq_norm(self) -> float:
        return self.sum_sq_norm / max(self.count, 1)

    def to_attrs(self, sum_slot: int) -> dict:
        """The attributes of a version-2 store: the scalars, and the slot holding the sum vector."""
        return {
            "count": self.count,
            "sum_slot": sum_slot,
            "sum_sq_norm": self.sum_sq_norm,
            "max_abs": self.max_abs,
            "nonfinite_values": self.nonfinite_values,
            "nonfinite_contexts": self.nonfinite_contexts,
            "outlier_rows": self.outlier_rows,
        }

    @classmethod
    def from_attrs(cls, d: int, obj: dict, total) -> RunningStats:
        """From the attributes and the sum vector (version 1 keeps it in the attributes: obj["sum"])."""
        return cls(
            d,
            obj["count"],
            total,
            obj["sum_sq_norm"],
            obj["max_abs"],
            obj["nonfinite_values"],
            obj["nonfinite_contexts"],
            obj.get("outlier_rows", 0),
        )


def split_counts(n_contexts: int, eval_fraction: float) -> tuple[int, int]:
    """(train, eval) context counts: eval gets round(f * n), at least one when f > 0 and n > 1."""
    n_eval = int(round(n_contexts * eval_fraction))
    if eval_fraction > 0 and n_contexts > 1:
        n_eval = max(n_eval, 1)
    return n_contexts - n_eval, n_eval


def assign_split(n_contexts: int, eval_fraction: float, seed: int, first: int = 0) -> np.ndarray:
    """int8 [n_contexts]: SPLIT_CODES per context, eval contexts a seeded random subset. `first`: the
    index of the first of these contexts in the store (an append's contexts draw on a stream of their own)."""
    _, n_eval = split_counts(n_contexts, eval_fraction)
    rng = np.random.default_rng([seed, 0x5E1] + ([first] if first else []))
    split = np.zeros(n_contexts, np.int8)
    split[rng.choice(n_contexts, size=n_eval, replace=False)] = SPLIT_CODES["eval"]
    return split


def planned_rows(
    tokens: np.ndarray, context_split: np.ndarray, drop_first: int, excluded_tokens: list[int]
) -> dict[str, int]:
    """Rows each split will hold at most: its contexts' stored positions (before the outlier filter)."""
    stored = stored_positions(tokens, drop_first, excluded_tokens).sum(axis=1)
    return {split: int(stored[context_split == code].sum()) for split, code in SPLIT_CODES.items()}


def stored_positions(tokens: np.ndarray, drop_first: int, excluded_tokens: list[int]) -> np.ndarray:
    """Bool mask [n_contexts, C] of the positions whose activations a store keeps (before the
    outlier filter): not among the first `drop_first`, and not an excluded (special) token."""
    keep = ~np.isin(tokens, np.asarray(excluded_tokens, dtype=tokens.dtype))
    keep[:, :drop_first] = False
    return keep


def contexts_needed(tokens: int, rows_per_context: int, eval_fraction: float) -> int:
    """How many contexts give at least `tokens` training rows once the eval share is set aside."""
    n_train = math.ceil(tokens / rows_per_context)
    n = math.ceil(n_train / (1 - eval_fraction)) if eval_fraction > 0 else n_train
    while split_counts(n, eval_fraction)[0] < n_train:
        n += 1
    return n
