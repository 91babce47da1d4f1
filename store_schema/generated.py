"""Stores written from given rows instead of a model: the synthetic stores of the tests and the benchmarks
(planted features, random rows, stores of any size). They follow the same commit protocol as a collect,
through StoreWriter, with normalization `none` and one position per "context"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from store_schema import schema
from store_schema.normalization import Normalization
from store_schema.writer import StoreWriter


def write_array_store(
    path: str | Path,
    train: np.ndarray | dict[str, np.ndarray],
    eval_rows: np.ndarray | dict[str, np.ndarray],
    *,
    hook: str = "synthetic",
    chunk_rows: int = 4096,
    shard_chunks: int = 1,
) -> Path:
    """A complete store (normalization `none`) holding the given rows, as if collected: one position per
    "context", so its mapping and token arrays are trivial. For tests and ground-truth benchmarks. Rows of
    several hooks, row-aligned: `train` and `eval_rows` as {hook: rows} (then `hook` is unused)."""
    if not isinstance(train, dict):
        train, eval_rows = {hook: train}, {hook: eval_rows}
    splits = {"train": train, "eval": eval_rows}
    first = next(iter(train))
    return write_generated_store(
        path,
        {name: len(rows[first]) for name, rows in splits.items()},
        train[first].shape[1],
        lambda split, start, stop: {h: rows[start:stop] for h, rows in splits[split].items()},
        hook=first,
        chunk_rows=chunk_rows,
        shard_chunks=shard_chunks,
        widths={h: rows.shape[1] for h, rows in train.items()},
    )


def write_generated_store(
    path: str | Path,
    n_rows: dict[str, int],
    d: int,
    rows: Callable[[str, int, int], np.ndarray],
    *,
    hook: str = "synthetic",
    chunk_rows: int = 4096,
    commit_chunks: int = 8,
    shard_chunks: int = 1,
    on_rows: Callable[[int], None] | None = None,
    widths: dict[str, int] | None = None,
) -> Path:
    """A complete store (normalization `none`) of `n_rows[split]` rows per split, asked of `rows(split,
    start, stop)` and committed `commit_chunks` chunks at a time as a collect would, so a store of any
    size is written in bounded memory (the synthetic stores of tests and benchmarks). One position per
    "context": the mapping and token arrays are trivial. `on_rows(n)` hears of each piece written.
    `shard_chunks` > 1: the row arrays are sharded, and each commit writes whole shards.
    Several hooks: `widths` {hook: width} (d is then the model's width), and `rows` gives {hook: rows}."""
    widths = widths or {hook: d}
    n_train, n_eval = n_rows["train"], n_rows["eval"]
    n_contexts = n_train + n_eval
    token_pieces = (
        np.zeros((min(schema.TOKENS_CHUNK_CONTEXTS, n_contexts - i), 2), np.int32)
        for i in range(0, n_contexts, schema.TOKENS_CHUNK_CONTEXTS)
    )
    split = np.concatenate([np.zeros(n_train, np.int8), np.ones(n_eval, np.int8)])
    header = schema.new_header(
        writer="saepipe synthetic",
        config_fingerprint=schema.fingerprint(
            {"synthetic": True, "n": [n_train, n_eval], "d": d} | ({} if list(widths) == [hook] else {"widths": widths})
        ),
        collect_config={},
        model={"name": "synthetic", "revision": "synthetic", "d_model": d, "n_layers": 0, "dtype": "float32"},
        text_source={"name": "synthetic"},
        tokenizer={},
        context_size=2,
        dropped_positions=[0],
        excluded_tokens=[],
        outlier_factor=None,
        hooks=list(widths),
        d_model=d,
        token_budget=n_train,
        shuffle={},
        split={},
        normalization_mode="none",
        warmup_rows=0,
        nonfinite_policy="skip",
        hook_widths=widths,
    )
    writer = StoreWriter.create(path, header, token_pieces, split, chunk_rows, shard_chunks=shard_chunks)
    writer.record_normalization({h: Normalization("none") for h in widths})
    step = chunk_rows * shard_chunks * max(1, commit_chunks // shard_chunks)
    for name, offset in (("train", 0), ("eval", n_train)):
        stats = {h: schema.RunningStats(w) for h, w in widths.items()}
        for block, start in enumerate(range(0, n_rows[name], step)):
            stop = min(start + step, n_rows[name])
            given = rows(name, start, stop)
            acts = {}
            for h, w in widths.items():
                fp16 = np.asarray(given[h] if isinstance(given, dict) else given).astype(np.float16, copy=False)
                if fp16.shape != (stop - start, w):
                    raise ValueError(
                        f"rows({name!r}, {start}, {stop}) gave {h} shape {fp16.shape}, not {(stop - start, w)}"
                    )
                stats[h].update(fp16, fast=True)
                acts[h] = fp16
            contexts = np.arange(offset + start, offset + stop)
            writer.write_rows(name, start, acts, contexts, np.ones(stop - start, np.int16))
            writer.commit(name, block + 1, stop, stats, [])
            if on_rows is not None:
                on_rows(stop - start)
    writer.finalize()
    return Path(path)
