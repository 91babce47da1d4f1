"""`saepipe collect --append STORE --tokens N`: grow a complete store to N training tokens.

The new contexts are the ones a collect packs after the store's own: the text source is packed again
(packing is deterministic) and the first contexts must reproduce the store's tokens exactly, so the
new ones continue the same text. They get a seeded train/eval assignment of their own, and their
blocks follow the store's blocks, written after its rows with the store's recorded normalization
(never estimated again) and its running statistics continued. The store's settings are the append's:
only where the forward passes run (device, dask workers) can be chosen.

Until the append finishes, readers see the store as it was (store_schema.writer: the `append`
attribute); an interrupted append is resumed by running the same command again.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from stages import __version__
from stages.basics.errors import SaepipeError
from stages.collect.config import CollectConfig
from stages.collect.plan import PlanAction
from stages.text.packing import pack_contexts
from stages.text.sources import open_text_source
from store_schema import schema
from store_schema.header import StoreHeader
from store_schema.reader import ActivationStore
from store_schema.writer import StoreWriter


def store_config(cfg: CollectConfig) -> CollectConfig:
    """The store's own collect settings, with cfg's --tokens and where the work runs."""
    header = _open(cfg.out).header
    recorded = {f.name for f in dataclasses.fields(CollectConfig)}
    saved = {key: value for key, value in header.collect_config.items() if key in recorded}
    saved["hooks"] = header.hooks  # the store's order (collect_config keeps them sorted)
    return dataclasses.replace(cfg, **{**saved, "tokens": cfg.tokens}).validate()


def plan(cfg: CollectConfig) -> PlanAction:
    """Start an append, resume an interrupted one, or nothing (the store already has --tokens)."""
    header = _open(cfg.out).header
    pending = header.pending_append
    if pending:
        if pending.tokens != cfg.tokens:
            raise SaepipeError(
                f"an append of {cfg.out} to {pending.tokens:,} tokens was interrupted: finish it "
                f"first with --tokens {pending.tokens}"
            )
        return PlanAction.RESUME_APPEND
    if not header.complete:
        raise SaepipeError(
            f"store {cfg.out} is incomplete: finish it first by running its `saepipe collect --out "
            f"{cfg.out} ...` command again, then append"
        )
    budget = header.token_budget
    if cfg.tokens < budget:
        raise SaepipeError(
            f"--tokens {cfg.tokens:,} is fewer than the {budget:,} tokens store {cfg.out} holds: "
            f"--append --tokens N grows it to N tokens in all; ask for more than {budget:,}"
        )
    if cfg.tokens == budget:
        return PlanAction.APPEND_DONE
    room = header.split.n_train_contexts * cfg.rows_per_context
    if cfg.tokens <= room:
        raise SaepipeError(
            f"store {cfg.out} already has room for {room:,} training tokens in its contexts (its "
            f"budget is {budget:,}): ask for more than {room:,} to append contexts"
        )
    return PlanAction.START_APPEND


def begin(cfg: CollectConfig, model, writer: StoreWriter) -> None:
    """Pack the contexts the append adds (checking the store's are packed again identically), give them
    their splits, and start the append. `model`: anything with the store's tokenizer."""
    header = writer.header
    first, old_train = writer.n_contexts(), header.split.n_train_contexts
    need_train = math.ceil(cfg.tokens / cfg.rows_per_context) - old_train
    added = schema.contexts_needed(need_train * cfg.rows_per_context, cfg.rows_per_context, cfg.eval_fraction)
    tokens = _pack(cfg, model.tokenizer, header, first, first + added)
    if schema.tokens_fingerprint(tokens[:first]) != header.tokens_fingerprint:
        raise SaepipeError(
            f"the text source {cfg.dataset} no longer packs into the store's contexts (its text or "
            f"the tokenizer changed): an append continues the very text the store was collected from"
        )
    new, split = tokens[first:], schema.assign_split(added, cfg.eval_fraction, cfg.seed, first)
    planned = schema.planned_rows(new, split, cfg.drop_first, list(header.excluded_tokens))
    print(
        f"appending {added:,} contexts to {cfg.out} ({first:,} now), towards {cfg.tokens:,} training tokens",
        file=sys.stderr,
    )
    writer.begin_append(cfg.tokens, new, split, planned, schema.tokens_fingerprint(tokens), f"saepipe {__version__}")


def _pack(cfg: CollectConfig, tok, header: StoreHeader, first: int, n_contexts: int) -> np.ndarray:
    def source_documents():
        return open_text_source(cfg.dataset, split=cfg.dataset_split, text_column=cfg.text_column).documents()

    try:
        return pack_contexts(
            source_documents(),
            tok.encode,
            context_size=cfg.context_size,
            n_contexts=n_contexts,
            bos_token_id=header.tokenizer.bos_token_id,
            separator_token_id=header.tokenizer.separator_token_id,
            progress=cfg.progress,
        )
    except SaepipeError:
        available = _contexts_available(source_documents(), tok.encode, cfg.context_size)
        if available >= n_contexts:
            raise
    most = (
        header.split.n_train_contexts + schema.split_counts(max(available - first, 0), cfg.eval_fraction)[0]
    ) * cfg.rows_per_context
    raise SaepipeError(
        f"the text source {cfg.dataset} holds {available:,} contexts of {cfg.context_size} tokens, "
        f"the store uses {first:,} and the append needs {n_contexts - first:,} more: --tokens can be "
        f"at most {most:,} for this store"
    ) from None


def _contexts_available(documents, encode, context_size: int) -> int:
    """How many contexts pack_contexts can fill from these documents (each holds context_size - 1 text
    tokens after its BOS; documents are joined with one separator token)."""
    stream, any_document = 0, False
    for doc in documents:
        n = len(encode(doc)) if doc else 0
        if n:
            stream += n + (1 if any_document else 0)
            any_document = True
    return stream // (context_size - 1)


def _open(path: str) -> ActivationStore:
    try:
        store = ActivationStore.open(path)
    except schema.StoreError as e:
        raise SaepipeError(f"--append {path}: {e}") from None
    header = store.header
    if not header.collect_config or header.split.n_train_contexts is None:
        raise SaepipeError(
            f"store {path} was not written by `saepipe collect` (it records no collect settings to "
            f"continue): only collected stores can be appended to"
        )
    return store
