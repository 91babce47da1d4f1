"""The per-block steps of a collect, the same wherever they run (this process or dask workers).

The work is cut into blocks of whole contexts (the shuffle buffer). A block depends only on (seed, block
index) and goes through three steps: `forward_block` (the model, up to the deepest hook),
`normalize_block` (outliers marked, rows normalized) and `prepare_block` (rows permuted and cast to
fp16, the block's own statistics). Its rows are then written after the rows committed so far and the
block is committed, strictly in block order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.collect.config import CollectConfig
from stages.collect.context_tokens import ContextTokens
from stages.host_model.model import run_to_hooks
from store_schema import schema
from store_schema.header import StoreHeader
from store_schema.normalization import Normalization
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


def contexts_per_block(cfg: CollectConfig) -> int:
    return max(1, cfg.shuffle_buffer_rows // cfg.rows_per_context)


def _block_plan(cfg: CollectConfig, header: StoreHeader, context_split: np.ndarray, split: str) -> list[np.ndarray]:
    """The split's contexts cut into blocks, those of the first collect, then those of each append in
    turn; training contexts in a seeded random order, so every block (the first one, which fixes the
    normalization, included) samples the whole corpus, or all the text an append added."""
    firsts = [0] + [a.contexts[0] for a in header.appends]
    if header.pending_append:
        firsts.append(header.pending_append.contexts[0])
    per_block, blocks = contexts_per_block(cfg), []
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
            for index in range(writer.progress(split).blocks_done, len(plan))
        ]
    return tasks


def progress_bar(cfg: CollectConfig, tokens: ContextTokens, todo: list[BlockTask]) -> tqdm:
    """Stored positions: all of them, those of the blocks still to do counted as not done yet."""
    total = int(tokens.stored_counts.sum())
    left = int(sum(tokens.stored_counts[task.contexts].sum() for task in todo))
    return tqdm(
        total=total,
        initial=total - left,
        unit="tok",
        unit_scale=True,
        desc="collect",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )


def forward_block(
    cfg: CollectConfig, model, hooks: list[str], task: BlockTask, tokens: np.ndarray, keep: np.ndarray, on_rows=None
) -> Block:
    """Run the model over the block's contexts (`tokens`, `keep`: their rows of the store's tokens and
    stored-position mask); `on_rows(n)` hears of the rows of each batch."""
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
