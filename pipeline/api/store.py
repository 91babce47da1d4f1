"""A store as a teammate's own code sees it: what it holds, its rows with their tokens, shuffled batches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from pipeline.api.batches import ActivationDataset, Batches
from pipeline.describe import describe_store, summary_text
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore
from store_schema.schema import SPLITS, StoreError


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a split: where each came from, and (when a hook was named) its activations.
    ``tokens[i]`` is the token at ``position[i]`` of context ``context[i]``, whose activation is ``acts[i]``."""

    split: str
    start: int
    context: np.ndarray  # int32 [n]: index of the row's context (Store.context_tokens)
    position: np.ndarray  # int16 [n]: the row's position in its context
    tokens: np.ndarray  # int32 [n]: the token at that position
    acts: torch.Tensor | None  # float32 [n, d_model], normalized or raw as asked; None when no hook was named

    def __len__(self) -> int:
        return len(self.context)

    def __repr__(self) -> str:
        acts = "no activations" if self.acts is None else f"acts {list(self.acts.shape)}"
        return f"Rows({self.split} rows {self.start:,}..{self.start + len(self):,}, {acts})"


class Store:
    """An activation store opened read-only (open_store). Rows are committed rows only: a store that a
    collect is still writing shows what it has committed so far."""

    def __init__(self, store: ActivationStore):
        self._store = store

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        return self._store.location

    @property
    def hooks(self) -> list[str]:
        return self._store.hooks

    @property
    def d_model(self) -> int:
        """The model's residual width: the width of every hook's rows unless `width` says otherwise."""
        return self._store.d_model

    def width(self, hook: str) -> int:
        """The width of one hook's rows (d_model, or e.g. an MLP's hidden width for mlp.hook_post)."""
        return self._store.width(hook)

    @property
    def context_size(self) -> int:
        return self._store.context_size

    @property
    def model_name(self) -> str:
        return self._store.header.model.name

    @property
    def complete(self) -> bool:
        return self._store.complete

    @property
    def fingerprint(self) -> str:
        """Identity of the contents: equal fingerprints mean the same rows (store_schema/SPEC.md)."""
        return self._store.fingerprint

    def n_rows(self, split: str = "train") -> int:
        return self._store.n_rows(_split(split))

    def normalization(self, hook: str) -> Normalization:
        """The map from the model's raw activations to the stored rows (recorded when the store was
        collected): ``apply`` raw -> stored, ``invert`` stored -> raw."""
        return self._store.normalization(hook)

    @property
    def provenance(self) -> dict:
        """Where the rows came from: the model, the text, the tokenizer, the settings of the collect that
        wrote them and the saepipe that wrote them (copies of the store's header, safe to change)."""
        return self._store.header.records(
            "model", "text_source", "tokenizer", "collect_config", "writer", "dropped_positions"
        )

    def summary(self) -> dict:
        """What `saepipe info STORE` prints, as a dict."""
        return describe_store(self._store)

    def __repr__(self) -> str:
        return f"<saepipe Store>\n{summary_text(self.summary(), '  ')}"

    # -- rows and their tokens ------------------------------------------------------------------------
    def rows(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        hook: str | None = None,
        split: str = "train",
        raw: bool = False,
    ) -> Rows:
        """Committed rows [start, stop) in stored order (collect shuffled them), with the context, position
        and token of each; with `hook`, their activations: as stored (normalized), or the model's raw
        activations when `raw` (the recorded normalization inverted, exact up to fp16 rounding)."""
        split = _split(split)
        n = self._store.n_rows(split)
        if int(start) < 0 or (stop is not None and int(stop) < int(start)):
            raise StoreError(
                f"rows({start}, {stop}) is not a range of rows: give 0 <= start <= stop (the {split} split has "
                f"{n:,} rows; negative indices are not counted from the end)"
            )
        stop = n if stop is None else min(int(stop), n)
        start = min(int(start), stop)
        context, position = self._store.read_mapping(split, start, stop)
        tokens = self._token_at(context, position)
        acts = None
        if hook is not None:
            self._store.require_hook(hook)
            acts = torch.from_numpy(self._store.read_rows(split, hook, start, stop)).float()
            if raw:
                stats = self._store.read_row_stats(split, hook, start, stop)
                acts = self.normalization(hook).invert(acts, None if stats is None else torch.from_numpy(stats))
        return Rows(split, start, context, position, tokens, acts)

    def context_tokens(self, context: int) -> np.ndarray:
        """The token ids of one context (all of it, the positions that have no rows included)."""
        n_contexts = len(self._store.context_split)
        if not 0 <= int(context) < n_contexts:
            raise IndexError(f"context {context} is not in the store (it has {n_contexts:,} contexts)")
        return np.asarray(self._store.tokens[int(context)])

    @cached_property
    def tokenizer(self):
        """The tokenizer of the store's model (loaded on first use, without the model's weights)."""
        from stages.host_model.loading import load_tokenizer  # transformers: slow to import, rarely needed

        return load_tokenizer(self.model_name)

    def decode(self, token_ids) -> str:
        """Token ids -> text, with the store's model's tokenizer."""
        return self.tokenizer.decode([int(t) for t in np.asarray(token_ids).reshape(-1)])

    def snippet(self, context: int, position: int, before: int = 12, after: int = 4) -> str:
        """The text around one token, the token itself between ⟦ ⟧: what a latent browser shows for a row."""
        ids = self.context_tokens(context)
        position = int(position)
        if not 0 <= position < len(ids):
            raise IndexError(f"position {position} is outside a context of {len(ids)} tokens")
        left = self.decode(ids[max(0, position - before) : position])
        right = self.decode(ids[position + 1 : position + 1 + after])
        return f"{left}⟦{self.decode(ids[position : position + 1])}⟧{right}"

    def _token_at(self, context: np.ndarray, position: np.ndarray) -> np.ndarray:
        if len(context) == 0:
            return np.zeros(0, np.int32)
        # One read of the span of contexts the rows touch (rows are shuffled: it may be most of them).
        first, last = int(context.min()), int(context.max())
        block = np.asarray(self._store.tokens[first : last + 1])
        return block[context.astype(np.int64) - first, position.astype(np.int64)]

    # -- batches -------------------------------------------------------------------------------------
    def batches(
        self,
        hook: str,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        start: int = 0,
        raw: bool = False,
        split: str = "train",
        resident: bool | None = None,
    ) -> Batches:
        """Endless shuffled batches [batch_size, d_model] of one hook: the loader `saepipe train` uses.
        Batch `i` depends only on (seed, i), so `start=i` resumes a sequence exactly where it stopped."""
        _check_batching(batch_size, start)
        return Batches(
            self._store, hook, batch_size, device=device, dtype=dtype, seed=seed, start=start, raw=raw,
            split=_split(split), resident=resident,
        )  # fmt: skip

    def dataset(
        self,
        hook: str,
        batch_size: int,
        *,
        seed: int = 0,
        n_batches: int | None = None,
        start: int = 0,
        raw: bool = False,
        split: str = "train",
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> ActivationDataset:
        """A torch IterableDataset of batches for a DataLoader (use ``batch_size=None`` there): each
        DataLoader worker of each torch.distributed rank gets its own share of every global batch, so no
        row is served twice in an epoch. See ActivationDataset."""
        _check_batching(batch_size, start)
        if n_batches is not None and int(n_batches) < 0:
            raise StoreError(f"n_batches must be at least 0 (or None: endless), got {n_batches}")
        return ActivationDataset(
            self.location, hook, batch_size, seed=seed, n_batches=n_batches, start=start, raw=raw,
            split=_split(split), dtype=dtype, rank=rank, world_size=world_size,
        )  # fmt: skip


def _check_batching(batch_size: int, start: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise StoreError(f"batch_size must be a positive whole number of rows, got {batch_size!r}")
    if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 0:
        raise StoreError(f"start must be a batch index of at least 0, got {start!r}")


def open_store(path: str | os.PathLike) -> Store:
    """Open a store read-only: a local folder, or a URL (s3://, gs://, http(s)://, file://). Raises
    StoreError, one line saying what is wrong and what to do, for anything that is not a readable store."""
    return Store(ActivationStore.open(path))


def _split(split: str) -> str:
    if split not in SPLITS:
        raise StoreError(f"unknown split {split!r}: a store has {' and '.join(SPLITS)}")
    return split
