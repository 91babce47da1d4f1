"""The per-block steps of a collect, the same wherever they run (this process or dask workers).

The work is cut into blocks of whole contexts (the shuffle buffer). A block depends only on (seed, block
index) and goes through three steps: `forward_block` (the model, up to the deepest hook),
`mark_outliers` (rows beyond the outlier bound marked) and `prepare_block` (rows permuted, normalized
and cast to fp16, the block's own statistics). Its rows are then written after the rows committed so far and the
block is committed, strictly in block order.

The rows stay on the model's device until they are fp16 in stored order (`prepare_rows`): on a GPU the
finiteness check, the outlier mask, the normalization, the permutation and the cast run there, and only
the fp16 rows cross to the host, through pinned buffers and a copy that overlaps the next batch's forward
(`HostStaging`). The statistics are float64 sums over those fp16 rows on the host (`summarize`): numpy's
sums have one order on every machine, where torch's CPU reductions split by thread count, and a resumed
or dask-run collect must end with the very same sums."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
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
    raw: dict[str, torch.Tensor]  # hook -> float32 [n, d] on the model's device, rows in context order
    row_context: np.ndarray  # [n] context index of each row
    row_position: np.ndarray  # [n] position of each row in its context
    nonfinite: dict[str, tuple[int, int]]  # hook -> (non-finite values, contexts hit)
    dropped: list[int]  # contexts skipped for non-finite activations

    def to_host(self) -> Block:
        """The block with its rows on the CPU: what travels between dask workers."""
        return Block(**{**self.__dict__, "raw": {h: r.cpu() for h, r in self.raw.items()}})


@dataclass
class MarkedBlock:
    """A block with its outlier rows marked, and the normalization its kept rows are stored in."""

    block: Block
    keep: np.ndarray  # [n] bool: rows within every hook's outlier bound
    norms: dict[str, Normalization]
    outlier_rows: dict[str, int]  # hook -> rows beyond its bound


@dataclass
class Rows:
    """Consecutive rows as stored: fp16 activations per hook, their mapping, and their row stats."""

    acts: dict[str, np.ndarray]  # hook -> float16 [n, d]
    row_context: np.ndarray  # [n]
    row_position: np.ndarray  # [n]
    row_stats: dict[str, np.ndarray] | None  # hook -> float32 [n, 2], --normalize token only
    wait: Callable[[], None] | None = None  # until it returns, the arrays may still be filling (HostStaging)
    borrowed: bool = False  # the arrays are HostStaging's, filled again a few blocks later: copy what is kept

    def wait_copied(self) -> None:
        if self.wait is not None:
            self.wait()
            self.wait = None

    def __len__(self) -> int:
        return len(self.row_context)

    def slice(self, lo: int, hi: int, copy: bool = False) -> Rows:
        """Rows [lo, hi); copied when the slice should not keep the whole block alive."""
        self.wait_copied()
        take = (lambda a: a[lo:hi].copy()) if copy else (lambda a: a[lo:hi])
        return Rows(
            {h: take(a) for h, a in self.acts.items()},
            take(self.row_context),
            take(self.row_position),
            None if self.row_stats is None else {h: take(a) for h, a in self.row_stats.items()},
            borrowed=self.borrowed and not copy,
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        for part in parts:
            part.wait_copied()
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
        self.wait_copied()
        writer.write_rows(split, start, self.acts, self.row_context, self.row_position, self.row_stats)

    @staticmethod
    def write_run(parts: list[Rows], writer: StoreWriter, split: str, start: int) -> None:
        """Write rows that follow one another in several `parts` as one run from `start`, without joining
        them in memory (`concat` joins them)."""
        parts = [part for part in parts if len(part)]
        for part in parts:
            part.wait_copied()
        first = parts[0]
        writer.write_rows(
            split,
            start,
            {h: [part.acts[h] for part in parts] for h in first.acts},
            [part.row_context for part in parts],
            [part.row_position for part in parts],
            None if first.row_stats is None else {h: [part.row_stats[h] for part in parts] for h in first.row_stats},
        )

    def empty_like(self, n: int) -> Rows:
        """Buffers for `n` rows, shaped and typed as these."""

        def like(a):
            return np.empty((n,) + a.shape[1:], a.dtype)

        stats = None if self.row_stats is None else {h: like(a) for h, a in self.row_stats.items()}
        return Rows({h: like(a) for h, a in self.acts.items()}, like(self.row_context), like(self.row_position), stats)

    def copy_to(self, target: Rows) -> None:
        """Copy these rows into `target` (as many rows, shaped alike)."""
        self.wait_copied()
        for h, acts in self.acts.items():
            target.acts[h][...] = acts
        target.row_context[...] = self.row_context
        target.row_position[...] = self.row_position
        for h, stats in (self.row_stats or {}).items():
            target.row_stats[h][...] = stats


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
    stored-position mask); `on_rows(n)` hears of the rows of each batch. The stored positions' rows are
    gathered on the model's device into one buffer per hook; the host learns only whether a batch had
    non-finite values (and, when it had, how many)."""
    raw: dict[str, torch.Tensor] = {}
    filled, row_context, row_position, dropped = 0, [], [], []
    nonfinite = {h: [0, 0] for h in hooks}
    captures: dict[str, torch.Tensor] = {}  # one batch's activations, reused batch after batch
    for start in range(0, len(task.contexts), cfg.batch_size):
        ids = task.contexts[start : start + cfg.batch_size]
        batch = torch.from_numpy(tokens[start : start + cfg.batch_size].astype(np.int64))
        acts = run_to_hooks(model, batch, hooks, captures)
        mask = keep[start : start + cfg.batch_size].copy()
        device = acts[hooks[0]].device
        bad_values = _nonfinite_values(acts, hooks, torch.from_numpy(mask).to(device, non_blocking=True))
        if bad_values is not None:
            for hook, bad in zip(hooks, bad_values):
                nonfinite[hook][0] += int(bad.sum())
                nonfinite[hook][1] += int((bad > 0).sum())
            finite = (bad_values == 0).all(dim=0).numpy()
            bad = [int(c) for c in ids[~finite]]
            if bad and cfg.nonfinite == "abort":
                raise SaepipeError(
                    f"non-finite activations in context(s) {bad[:5]} of the {task.split} split: "
                    f"rerun with --nonfinite skip to leave such contexts out (they are counted)"
                )
            dropped += bad
            mask &= finite[:, None]
        stored = np.flatnonzero(mask)  # the batch's stored rows, as rows of [batch x context]
        if not raw:  # room for every stored position of the block (fewer when contexts are dropped)
            rows = int(keep.sum())
            raw = {h: torch.empty(rows, acts[h].shape[-1], dtype=torch.float32, device=device) for h in hooks}
        where = torch.from_numpy(stored).to(device, non_blocking=True)
        for hook in hooks:
            flat = acts[hook].reshape(-1, acts[hook].shape[-1])
            torch.index_select(flat, 0, where, out=raw[hook][filled : filled + len(stored)])
        filled += len(stored)
        row_context.append(ids[stored // mask.shape[1]])
        row_position.append(stored % mask.shape[1])
        if on_rows is not None:
            on_rows(len(stored))
    return Block(
        task.split,
        task.index,
        {h: r[:filled] for h, r in raw.items()},
        np.concatenate(row_context),
        np.concatenate(row_position),
        {h: (v[0], v[1]) for h, v in nonfinite.items()},
        dropped,
    )


def _nonfinite_values(acts: dict[str, torch.Tensor], hooks: list[str], mask: torch.Tensor) -> torch.Tensor | None:
    """Non-finite values at stored positions per hook and context [hooks, batch] (CPU), or None when there
    are none. A row holding a non-finite value has a non-finite sum, so one cheap pass (the row sums)
    clears almost every batch; only a batch with a suspect row is counted value by value."""
    suspect = torch.stack([(~torch.isfinite(acts[h].sum(dim=-1)) & mask).any() for h in hooks]).any()
    if not bool(suspect):
        return None
    return torch.stack([(~torch.isfinite(acts[h]) & mask[..., None]).sum(dim=(1, 2)) for h in hooks]).cpu()


def estimate_normalization(cfg: CollectConfig, hooks: list[str], block: Block) -> dict[str, Normalization]:
    """The normalization of every hook, from the warm-up rows of the first training block."""
    if not len(block.row_context):
        raise SaepipeError(
            "every context of the first block had non-finite activations: "
            "the model or its dtype is broken (try --dtype float32)"
        )
    norms = {}
    for hook in hooks:
        try:
            norms[hook] = Normalization.estimate(cfg.normalize, block.raw[hook][: cfg.warmup_rows], cfg.outlier_factor)
        except ValueError as e:  # rows with no spread, or one so small its inverse is not a float32
            raise SaepipeError(
                f"{hook}: {e}; collect it with --normalize token or none, or check the model's activations there"
            ) from None
    return norms


def fix_normalization(writer: StoreWriter, norms: dict[str, Normalization]) -> dict[str, Normalization]:
    """Record the normalization in the store; returns the recorded (float32) values, as a resume reads them."""
    writer.record_normalization(norms)
    return writer.normalizations()


def mark_outliers(block: Block, norms: dict[str, Normalization], hooks: list[str]) -> MarkedBlock:
    """Mark the rows beyond any hook's outlier bound, on the rows' device."""
    inlier = {h: norms[h].inliers(block.raw[h]) for h in hooks}
    keep = torch.stack(list(inlier.values())).all(dim=0)
    outliers = torch.stack([(~inlier[h]).sum() for h in hooks]).tolist()
    return MarkedBlock(block, keep.cpu().numpy(), {h: norms[h] for h in hooks}, dict(zip(hooks, outliers)))


class HostStaging:
    """Where fp16 rows land on the host. From a CUDA device: pinned buffers, reused in turn (`slots` blocks
    may be in flight at once), filled by copies that do not block the device; `Rows.wait` waits for them.
    From the CPU the rows are the device's own memory: nothing is copied."""

    def __init__(self, slots: int = 2):
        self.slots, self.turn = slots, 0
        self.buffers: dict[tuple[int, str], torch.Tensor] = {}

    def to_host(self, rows: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], Callable[[], None] | None]:
        """(numpy views of the rows on the host, a wait for their copies or None)."""
        first = next(iter(rows.values()), None)
        if first is None or first.device.type != "cuda":
            return _on_host(rows), None
        slot, self.turn = self.turn, (self.turn + 1) % self.slots
        host = {}
        for name, tensor in rows.items():
            buffer = self.buffers.get((slot, name))
            if buffer is None or buffer.numel() < tensor.numel():
                buffer = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=True)
                self.buffers[(slot, name)] = buffer
            view = buffer[: tensor.numel()].view(tensor.shape)
            view.copy_(tensor, non_blocking=True)
            host[name] = view.numpy()
        copied = torch.cuda.Event()
        copied.record()
        return host, copied.synchronize


def _on_host(rows: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The rows as numpy arrays: the tensors' own memory on a CPU, a copy that waits from a GPU."""
    return {name: tensor.cpu().numpy() for name, tensor in rows.items()}


def prepare_rows(marked: MarkedBlock, seed: int, staging: HostStaging | None = None) -> Rows:
    """The kept rows in stored order (a training block's permuted, seeded by the block), normalized and cast
    to fp16 on their device: one gather, then in place. The fp16 rows then go to the host (`staging`:
    pinned, without waiting for the copy, see `Rows.wait`; without it, a plain copy). Normalization acts row by row, so normalizing
    after the permutation gives the very values of normalizing before it."""
    block, keep = marked.block, marked.keep
    n = int(keep.sum())
    perm = np.arange(n)
    if block.split == "train":
        perm = np.random.default_rng([seed, schema.SPLIT_CODES[block.split], block.index]).permutation(n)
    source = np.flatnonzero(keep)[perm]  # the block's row of each stored row
    device = next(iter(block.raw.values())).device
    order = torch.from_numpy(source).to(device, non_blocking=True)
    device_rows = {}
    for hook, norm in marked.norms.items():
        device_rows[hook], per_row = _normalized_fp16(block.raw[hook], order, norm, hook)
        if per_row is not None:
            device_rows[f"{hook}/row_stats"] = per_row
    host, wait = staging.to_host(device_rows) if staging is not None else (_on_host(device_rows), None)
    acts = {hook: host[hook] for hook in marked.norms}
    row_stats = {hook: host[f"{hook}/row_stats"] for hook in marked.norms if f"{hook}/row_stats" in host}
    return Rows(acts, block.row_context[source], block.row_position[source], row_stats or None, wait, wait is not None)


# Rows gathered, normalized and cast at a time on a CPU: each piece stays in cache through the five
# passes over it (gather, centre, scale, range check, cast), where whole-block passes went to memory five
# times. The same operations on the same values: the bytes do not depend on the piece size. A GPU takes
# the block at once.
CPU_PIECE_ROWS = 1024


def _normalized_fp16(
    raw: torch.Tensor, order: torch.Tensor, norm: Normalization, hook: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """raw[order], normalized and cast to fp16, and its per-row statistics (--normalize token)."""
    n = len(order)
    piece = n if raw.device.type != "cpu" else CPU_PIECE_ROWS
    out = torch.empty(n, raw.shape[1], dtype=torch.float16, device=raw.device)
    per_rows = []
    for lo in range(0, n, piece):
        normalized, per_row = norm.apply_(raw.index_select(0, order[lo : lo + piece]))
        out[lo : lo + piece] = _to_fp16(normalized, hook)
        if per_row is not None:
            per_rows.append(per_row)
    return out, (torch.cat(per_rows) if per_rows else None)


def summarize(marked: MarkedBlock, rows: Rows) -> BlockSummary:
    """The block's own statistics over its stored (fp16, host) rows, in float64, and what committing it
    needs. Waits for the rows' copy to the host."""
    rows.wait_copied()
    return _summary(marked, rows, {hook: _hook_stats(marked, rows, hook) for hook in rows.acts})


def summarize_in(pool: Executor, marked: MarkedBlock, rows: Rows) -> Callable[[], BlockSummary]:
    """`summarize`, each hook's statistics started in `pool` (numpy's sums let go of the GIL, so they run
    beside the rows' write); the returned call waits for them."""
    rows.wait_copied()
    started = {hook: pool.submit(_hook_stats, marked, rows, hook) for hook in rows.acts}
    return lambda: _summary(marked, rows, {hook: future.result() for hook, future in started.items()})


def _hook_stats(marked: MarkedBlock, rows: Rows, hook: str) -> schema.RunningStats:
    block = marked.block
    stats = schema.RunningStats(
        rows.acts[hook].shape[1],
        nonfinite_values=block.nonfinite[hook][0],
        nonfinite_contexts=block.nonfinite[hook][1],
        outlier_rows=marked.outlier_rows[hook],
    )
    stats.update(rows.acts[hook])
    return stats


def _summary(marked: MarkedBlock, rows: Rows, stats: dict[str, schema.RunningStats]) -> BlockSummary:
    block = marked.block
    return BlockSummary(block.split, block.index, len(rows), len(block.row_context), stats, block.dropped)


def prepare_block(marked: MarkedBlock, seed: int) -> PreparedBlock:
    """The block's rows in stored order, on the host, and its summary."""
    rows = prepare_rows(marked, seed)
    return PreparedBlock(summarize(marked, rows), rows)


# The smallest float32 that rounds to inf in float16: anything at or beyond it overflows the cast.
_FP16_OVERFLOW = 65520.0


def _to_fp16(rows: torch.Tensor, hook: str) -> torch.Tensor:
    low, high = torch.aminmax(rows)  # one pass over the float32 rows; NaN fails the test below as well
    if not (float(low) > -_FP16_OVERFLOW and float(high) < _FP16_OVERFLOW):
        raise SaepipeError(
            f"normalized activations at {hook} overflow float16 (max |x| {rows.abs().max().item():.3g}): "
            f"use --normalize center-scale or token, or lower --outlier-factor"
        )
    return rows.to(torch.float16)
