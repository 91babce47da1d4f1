"""Stage one: run the host model once over packed text and write normalized, shuffled fp16 rows.

The work is cut into blocks of whole contexts (the shuffle buffer). A block depends only on (seed, block
index) and goes through three steps: `forward_block` (the model, up to the deepest hook),
`normalize_block` (outliers marked, rows normalized) and `prepare_block` (rows permuted and cast to
fp16, the block's own statistics). Then its rows are written after the rows committed so far and the
block is committed, strictly in block order. Here the main thread runs the model and normalizes while
a writer thread prepares, writes and commits the previous block; `stages.collect_dask` runs the same
steps on dask workers. A killed collect resumes at the first uncommitted block and ends bit-identical
to an uninterrupted run, whichever way either part ran.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import CollectConfig
from stages import __version__
from stages.basics.errors import SaepipeError
from store_schema import schema
from store_schema.lock import StoreLock
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore
from store_schema.writer import StoreWriter


@dataclass
class Block:
    """Raw activations of one block's stored positions, as produced by the forward pass."""

    split: str
    index: int
    raw: dict[str, torch.Tensor]  # hook -> float32 [n, d] on CPU, rows in context order
    row_context: np.ndarray  # [n] context index of each row
    row_position: np.ndarray  # [n] position of each row in its context
    nonfinite: dict[str, tuple[int, int]]  # hook -> (non-finite values, contexts hit)
    dropped: list[int]  # contexts skipped for non-finite activations


@dataclass
class NormalizedBlock:
    """A block with its outliers marked and its kept rows normalized (float32, still in context order)."""

    block: Block
    keep: np.ndarray  # [n] bool: rows within every hook's outlier bound
    acts: dict[str, np.ndarray]  # hook -> [kept, d]
    row_stats: dict[str, np.ndarray]  # hook -> [kept, 2] (mean, scale) under --normalize token
    outlier_rows: dict[str, int]  # hook -> rows beyond its bound


@dataclass
class Rows:
    """Consecutive rows as stored: fp16 activations per hook, their mapping, and their row stats."""

    acts: dict[str, np.ndarray]  # hook -> float16 [n, d]
    row_context: np.ndarray  # [n]
    row_position: np.ndarray  # [n]
    row_stats: dict[str, np.ndarray] | None  # hook -> float32 [n, 2], --normalize token only

    def __len__(self) -> int:
        return len(self.row_context)

    def slice(self, lo: int, hi: int, copy: bool = False) -> Rows:
        """Rows [lo, hi); copied when the slice should not keep the whole block alive."""
        take = (lambda a: a[lo:hi].copy()) if copy else (lambda a: a[lo:hi])
        return Rows(
            {h: take(a) for h, a in self.acts.items()},
            take(self.row_context),
            take(self.row_position),
            None if self.row_stats is None else {h: take(a) for h, a in self.row_stats.items()},
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return Rows(
            {h: np.concatenate([p.acts[h] for p in parts]) for h in first.acts},
            np.concatenate([p.row_context for p in parts]),
            np.concatenate([p.row_position for p in parts]),
            None
            if first.row_stats is None
            else {h: np.concatenate([p.row_stats[h] for p in parts]) for h in first.row_stats},
        )

    def write(self, writer: StoreWriter, split: str, start: int) -> None:
        writer.write_rows(split, start, self.acts, self.row_context, self.row_position, self.row_stats)


@dataclass
class BlockSummary:
    """What committing a block needs: its row count, its own statistics and its dropped contexts."""

    split: str
    index: int
    n_rows: int
    positions: int  # stored positions the forward pass produced (before the outlier filter): progress
    stats: dict[str, schema.RunningStats]  # hook -> this block's statistics alone
    dropped: list[int]


@dataclass
class PreparedBlock:
    """A block ready to write: its rows in stored order and its summary."""

    summary: BlockSummary
    rows: Rows


@dataclass(frozen=True)
class BlockTask:
    """A block still to collect: which contexts, and whether it is the last block of its split."""

    split: str
    index: int
    contexts: np.ndarray
    last_of_split: bool


def plan_action(cfg: CollectConfig) -> str:
    """What to do with --out: 'create', 'resume' or 'done'. Refuses to touch another store."""
    out = Path(cfg.out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "create"
    try:
        existing = ActivationStore.open(out)
    except schema.StoreError:
        # --overwrite replaces a (possibly damaged) Zarr store, never a file or a folder of something else
        if cfg.overwrite and out.is_dir() and (out / "zarr.json").exists():
            return "create"
        hint = (
            " (--overwrite replaces only stores; remove it yourself if it must go)"
            if cfg.overwrite
            else ", or pass --overwrite to replace it if it is a damaged store"
        )
        raise SaepipeError(f"--out {out} exists and is not a saepipe store: choose another --out{hint}") from None
    if cfg.overwrite:
        return "create"
    differing = _differing_settings(cfg, existing)
    if differing is not None:
        raise SaepipeError(
            f"--out {out} holds a store of a different configuration (differs in: "
            f"{differing}): pass --overwrite to replace it, or choose another --out"
        )
    return "done" if existing.complete else "resume"


def _differing_settings(cfg: CollectConfig, existing: ActivationStore) -> str | None:
    """None when `existing` was collected with cfg's settings; else the ones that differ, listed."""
    theirs = existing.header.get("collect_config", {})
    ours = cfg.content_fields()
    if existing.header.get("config_fingerprint") == schema.fingerprint(ours):
        return None
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if existing.header.get("appends"):
        differing.append(f"grown by --append to {existing.header['token_budget']:,} tokens")
    return ", ".join(differing) or "version"


def run_collect(cfg: CollectConfig, model=None) -> str:
    """Collect the store `cfg` describes. `model`: an already loaded HostModel of cfg.model (benchmarks
    time the collect without the load). One collect at a time writes a store (store_schema.lock)."""
    cfg.validate()
    if cfg.append:
        if _is_remote(cfg.out):
            raise SaepipeError(
                f"--append needs a store on this machine, not {cfg.out}: copy it here with `saepipe "
                f"store copy`, append, and copy it back"
            )
        from stages import collect_append

        cfg = collect_append.store_config(cfg)
    elif _is_remote(cfg.out):
        return _collect_to_remote(cfg, model)
    with StoreLock(cfg.out):
        return str(_collect_locked(cfg, model))


def _is_remote(out: str) -> bool:
    return "://" in str(out) and not str(out).startswith("file://")


def _collect_to_remote(cfg: CollectConfig, model) -> str:
    """--out s3://... (any fsspec URL): collect into a local staging store (resumable like any collect,
    kept under the cache folder), then `store copy` it to the URL (resumable too; the root metadata
    goes last, so the URL never holds a half store)."""
    import dataclasses
    import hashlib

    from stages.basics.cache import cache_dir
    from store_schema.copy import copy_store

    try:
        existing = ActivationStore.open(cfg.out)
    except schema.StoreError:
        existing = None
    if existing is not None and existing.complete and not cfg.overwrite:
        differing = _differing_settings(cfg, existing)
        if differing is not None:
            raise SaepipeError(
                f"--out {cfg.out} holds a store of a different configuration (differs in: "
                f"{differing}): choose another --out (a remote store is never overwritten; "
                f"delete it there first)"
            )
        print(f"store {cfg.out} is already complete for this configuration; nothing to do", file=sys.stderr)
        return str(cfg.out)
    staging = cache_dir() / "staging" / (hashlib.sha256(str(cfg.out).encode()).hexdigest()[:16] + ".zarr")
    print(f"collecting into the local staging store {staging}, then copying it to {cfg.out}", file=sys.stderr)
    local = dataclasses.replace(cfg, out=str(staging))
    with StoreLock(staging):
        _collect_locked(local, model)
    copy_store(str(staging), str(cfg.out), progress=cfg.progress)
    shutil.rmtree(staging)
    return str(cfg.out)


def _collect_locked(cfg: CollectConfig, model) -> Path:
    out = Path(cfg.out)
    if cfg.append:
        from stages import collect_append

        action = "append-" + collect_append.plan(cfg)
    else:
        action = plan_action(cfg)
    if action == "append-done":
        print(f"store {out} already holds {cfg.tokens:,} tokens; nothing to do", file=sys.stderr)
        return out
    if action == "done":
        print(f"store {out} is already complete for this configuration; nothing to do", file=sys.stderr)
        return out
    if cfg.distributed:
        if model is not None:
            raise ValueError("a collect across dask workers loads the model on each worker: pass no model")
        from stages import collect_dask

        with collect_dask.connect(cfg) as client:
            facts = collect_dask.describe_model(client, cfg)
            writer = _open_or_create(cfg, facts, facts.hooks, action)
            collect_dask.fill_store(cfg, client, writer, facts)
    else:
        from stages.host_model.loading import load_host_model
        from stages.host_model.model import validate_hooks

        if model is None:
            model = load_host_model(cfg.model, cfg.device, cfg.dtype)
        hooks = validate_hooks(model, list(cfg.hooks))
        writer = _open_or_create(cfg, model, hooks, action)
        _fill_store(cfg, model, hooks, writer)
    writer.finalize()
    return out


def _open_or_create(cfg: CollectConfig, model, hooks: list[str], action: str) -> StoreWriter:
    """The writer of a new store ('create'), of the interrupted one to resume ('resume'), or of the store
    to append to ('append-start', 'append-resume'). `model`: a HostModel, or anything with its
    tokenizer, revision, d_model and n_layers (what dask workers report)."""
    out = Path(cfg.out)
    if action == "create":
        if out.exists():
            shutil.rmtree(out)
        return _create_store(cfg, model, hooks)
    writer = StoreWriter.open(out)
    writer.remove_leftover_temporaries()  # we hold the lock and no worker has started
    if writer.header["model"]["revision"] != model.revision:
        raise SaepipeError(
            f"{out} was collected from other weights of {cfg.model} "
            f"(revision {writer.header['model']['revision']}, now {model.revision}): "
            + ("an append needs the store's model" if cfg.append else "pass --overwrite to start again")
        )
    if action == "append-start":
        from stages import collect_append

        collect_append.begin(cfg, model, writer)
        return writer
    done = {s: writer.progress(s)["rows_committed"] for s in schema.SPLITS}
    print(
        f"resuming {'the append to ' if cfg.append else ''}{out}: {done['train']:,} train and {done['eval']:,} "
        f"eval rows committed",
        file=sys.stderr,
    )
    return writer


def _create_store(cfg: CollectConfig, model, hooks: list[str]) -> StoreWriter:
    from stages.text.packing import pack_contexts
    from stages.text.sources import open_text_source

    source = open_text_source(cfg.dataset, split=cfg.dataset_split, text_column=cfg.text_column)
    tok = model.tokenizer
    separator = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    n_contexts = schema.contexts_needed(cfg.tokens, cfg.rows_per_context, cfg.eval_fraction)
    tokens = pack_contexts(
        source.documents(),
        tok.encode,
        context_size=cfg.context_size,
        n_contexts=n_contexts,
        bos_token_id=tok.bos_token_id,
        separator_token_id=separator,
        progress=cfg.progress,
    )
    context_split = schema.assign_split(n_contexts, cfg.eval_fraction, cfg.seed)
    n_train, n_eval = schema.split_counts(n_contexts, cfg.eval_fraction)
    content = cfg.content_fields()
    header = {
        "schema": schema.SCHEMA_NAME,
        "schema_version": schema.SCHEMA_VERSION,
        "writer": f"saepipe {__version__}",
        "config_fingerprint": schema.fingerprint(content),
        "collect_config": content,
        "model": {
            "name": cfg.model,
            "revision": model.revision,
            "d_model": model.d_model,
            "n_layers": model.n_layers,
            "dtype": cfg.dtype,
        },
        "text_source": {**source.describe(), "tokens_fingerprint": schema.tokens_fingerprint(tokens)},
        "tokenizer": {
            "name": tok.name,
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_token_id,
            "separator_token_id": separator,
            "bos_at_position_0": True,
        },
        "context_size": cfg.context_size,
        "dropped_positions": list(range(cfg.drop_first)),
        "excluded_tokens": sorted({tok.bos_token_id, separator}) if cfg.exclude_special else [],
        "outlier_factor": cfg.outlier_factor,
        "hooks": hooks,
        "d_model": model.d_model,
        "token_budget": cfg.tokens,
        "shuffle": {
            "seed": cfg.seed,
            "buffer_rows": cfg.shuffle_buffer_rows,
            "contexts_per_block": _contexts_per_block(cfg),
        },
        "split": {"eval_fraction": cfg.eval_fraction, "n_train_contexts": n_train, "n_eval_contexts": n_eval},
        "normalization_mode": cfg.normalize,
        "warmup_rows": cfg.warmup_rows,
        "nonfinite_policy": cfg.nonfinite,
    }
    planned = schema.planned_rows(tokens, context_split, cfg.drop_first, header["excluded_tokens"])
    return StoreWriter.create(cfg.out, header, tokens, context_split, planned, cfg.chunk_rows)


def _contexts_per_block(cfg: CollectConfig) -> int:
    return max(1, cfg.shuffle_buffer_rows // cfg.rows_per_context)


def _block_plan(cfg: CollectConfig, header: dict, context_split: np.ndarray, split: str) -> list[np.ndarray]:
    """The split's contexts cut into blocks, those of the first collect, then those of each append in
    turn; training contexts in a seeded random order, so every block (the first one, which fixes the
    normalization, included) samples the whole corpus, or all the text an append added."""
    firsts = [0] + [a["contexts"][0] for a in header.get("appends", [])]
    if header.get("append"):
        firsts.append(header["append"]["contexts"][0])
    per_block, blocks = _contexts_per_block(cfg), []
    for first, end in zip(firsts, firsts[1:] + [len(context_split)]):
        ids = first + np.flatnonzero(context_split[first:end] == schema.SPLIT_CODES[split])
        if split == "train":
            ids = np.random.default_rng([cfg.seed, 0x0D3] + ([first] if first else [])).permutation(ids)
        blocks += [ids[i : i + per_block] for i in range(0, len(ids), per_block)]
    return blocks


def pending_blocks(cfg: CollectConfig, writer: StoreWriter) -> list[BlockTask]:
    """The blocks not committed yet, in the order they are committed (training blocks first)."""
    context_split = writer.group[schema.CONTEXT_SPLIT][:]
    tasks = []
    for split in schema.SPLITS:
        plan = _block_plan(cfg, writer.header, context_split, split)
        tasks += [
            BlockTask(split, index, plan[index], index == len(plan) - 1)
            for index in range(writer.progress(split)["blocks_done"], len(plan))
        ]
    return tasks


def stored_mask(cfg: CollectConfig, writer: StoreWriter) -> tuple[np.ndarray, np.ndarray]:
    """The store's tokens and the mask of their stored positions (before the outlier filter)."""
    tokens = writer.group[schema.TOKENS][:]
    return tokens, schema.stored_positions(tokens, cfg.drop_first, writer.header["excluded_tokens"])


def progress_bar(cfg: CollectConfig, keep: np.ndarray, todo: list[BlockTask]) -> tqdm:
    """Stored positions: all of them, those of the blocks still to do counted as not done yet."""
    total = int(keep.sum())
    left = int(sum(keep[task.contexts].sum() for task in todo))
    return tqdm(
        total=total,
        initial=total - left,
        unit="tok",
        unit_scale=True,
        desc="collect",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )


def _fill_store(cfg: CollectConfig, model, hooks: list[str], writer: StoreWriter) -> None:
    tokens, keep = stored_mask(cfg, writer)
    todo = pending_blocks(cfg, writer)
    bar = progress_bar(cfg, keep, todo)
    norms = writer.normalizations()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saepipe-writer") as pool:
        pending: Future | None = None
        for task in todo:
            block = forward_block(cfg, model, hooks, task, tokens[task.contexts], keep[task.contexts], bar.update)
            if norms is None:
                norms = fix_normalization(writer, estimate_normalization(cfg, hooks, block))
            # The torch work stays on this thread: torch ops issued from a second thread start a second
            # OpenMP team, whose spinning threads took ~7% of the forward's speed on 2 cores; the
            # writer's share is numpy and I/O.
            normalized = normalize_block(block, norms, hooks)
            if pending is not None:
                pending.result()  # one block in flight: bounded memory, writer errors surface here
            pending = pool.submit(_write_and_commit, cfg, writer, normalized)
        if pending is not None:
            pending.result()
    bar.close()


def _write_and_commit(cfg: CollectConfig, writer: StoreWriter, normalized: NormalizedBlock) -> None:
    prepared = prepare_block(normalized, cfg.seed)
    summary = prepared.summary
    prepared.rows.write(writer, summary.split, writer.progress(summary.split)["rows_committed"])
    writer.commit_block(summary.split, summary.index, summary.n_rows, summary.stats, summary.dropped)


def forward_block(
    cfg: CollectConfig, model, hooks: list[str], task: BlockTask, tokens: np.ndarray, keep: np.ndarray, on_rows=None
) -> Block:
    """Run the model over the block's contexts (`tokens`, `keep`: their rows of the store's tokens and
    stored-position mask); `on_rows(n)` hears of the rows of each batch."""
    from stages.host_model.model import run_to_hooks

    raw: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    row_context, row_position, dropped = [], [], []
    nonfinite = {h: [0, 0] for h in hooks}
    for start in range(0, len(task.contexts), cfg.batch_size):
        ids = task.contexts[start : start + cfg.batch_size]
        acts = run_to_hooks(model, torch.from_numpy(tokens[start : start + cfg.batch_size].astype(np.int64)), hooks)
        mask = torch.from_numpy(keep[start : start + cfg.batch_size])
        acts = {hook: acts[hook].float().cpu() for hook in hooks}
        finite = torch.ones(len(ids), dtype=torch.bool)
        for hook in hooks:
            bad_values = (~torch.isfinite(acts[hook]) & mask[..., None]).sum(dim=(1, 2))
            nonfinite[hook][0] += int(bad_values.sum())
            nonfinite[hook][1] += int((bad_values > 0).sum())
            finite &= bad_values == 0
        if not bool(finite.all()):
            bad = [int(c) for c in ids[~finite.numpy()]]
            if cfg.nonfinite == "abort":
                raise SaepipeError(
                    f"non-finite activations in context(s) {bad[:5]} of the {task.split} split: "
                    f"rerun with --nonfinite skip to leave such contexts out (they are counted)"
                )
            dropped += bad
            mask &= finite[:, None]
        for hook in hooks:
            raw[hook].append(acts[hook][mask])
        ctx_idx, positions = np.nonzero(mask.numpy())
        row_context.append(ids[ctx_idx])
        row_position.append(positions)
        if on_rows is not None:
            on_rows(int(mask.sum()))
    return Block(
        task.split,
        task.index,
        {h: torch.cat(v) for h, v in raw.items()},
        np.concatenate(row_context),
        np.concatenate(row_position),
        {h: (v[0], v[1]) for h, v in nonfinite.items()},
        dropped,
    )


def estimate_normalization(cfg: CollectConfig, hooks: list[str], block: Block) -> dict[str, Normalization]:
    """The normalization of every hook, from the warm-up rows of the first training block."""
    if not len(block.row_context):
        raise SaepipeError(
            "every context of the first block had non-finite activations: "
            "the model or its dtype is broken (try --dtype float32)"
        )
    return {
        hook: Normalization.estimate(cfg.normalize, block.raw[hook][: cfg.warmup_rows], cfg.outlier_factor)
        for hook in hooks
    }


def fix_normalization(writer: StoreWriter, norms: dict[str, Normalization]) -> dict[str, Normalization]:
    """Record the normalization in the store; returns the recorded (float32) values, as a resume reads them."""
    writer.record_normalization(norms)
    return writer.normalizations()


def normalize_block(block: Block, norms: dict[str, Normalization], hooks: list[str]) -> NormalizedBlock:
    inlier = {h: norms[h].inliers(block.raw[h]) for h in hooks}
    keep = torch.stack(list(inlier.values())).all(dim=0).numpy()
    acts, row_stats = {}, {}
    for hook in hooks:
        normalized, per_row = norms[hook].apply(block.raw[hook][keep])
        acts[hook] = normalized.numpy()
        if per_row is not None:
            row_stats[hook] = per_row.numpy()
    return NormalizedBlock(block, keep, acts, row_stats, {h: int((~inlier[h]).sum()) for h in hooks})


def prepare_block(normalized: NormalizedBlock, seed: int) -> PreparedBlock:
    """Permute a training block's rows (seeded by the block), cast them to fp16, and summarize them."""
    block, keep = normalized.block, normalized.keep
    n = int(keep.sum())
    perm = np.arange(n)
    if block.split == "train":
        perm = np.random.default_rng([seed, schema.SPLIT_CODES[block.split], block.index]).permutation(n)
    acts, stats = {}, {}
    for hook, rows in normalized.acts.items():
        acts[hook] = _to_fp16(rows[perm], hook)
        stats[hook] = schema.RunningStats(
            rows.shape[1],
            nonfinite_values=block.nonfinite[hook][0],
            nonfinite_contexts=block.nonfinite[hook][1],
            outlier_rows=normalized.outlier_rows[hook],
        )
        stats[hook].update(acts[hook])
    row_stats = {hook: per_row[perm] for hook, per_row in normalized.row_stats.items()}
    rows = Rows(acts, block.row_context[keep][perm], block.row_position[keep][perm], row_stats or None)
    return PreparedBlock(BlockSummary(block.split, block.index, n, len(block.row_context), stats, block.dropped), rows)


def _to_fp16(rows: np.ndarray, hook: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = rows.astype(np.float16)
    if not np.isfinite(out).all():
        raise SaepipeError(
            f"normalized activations at {hook} overflow float16 (max |x| {np.abs(rows).max():.3g}): "
            f"use --normalize center-scale or token, or lower --outlier-factor"
        )
    return out
