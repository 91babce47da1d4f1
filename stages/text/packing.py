"""Packing documents into fixed-size token contexts that each start with BOS."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from stages.basics.errors import SaepipeError


def pack_contexts(
    documents: Iterable[str],
    encode: Callable[[str], list[int]],
    *,
    context_size: int,
    n_contexts: int,
    bos_token_id: int,
    separator_token_id: int,
    progress: bool = True,
) -> np.ndarray:
    """All the contexts of `iter_packed_contexts` in one int32 ``[n_contexts, context_size]`` array."""
    pieces = list(
        iter_packed_contexts(
            documents,
            encode,
            context_size=context_size,
            n_contexts=n_contexts,
            bos_token_id=bos_token_id,
            separator_token_id=separator_token_id,
            progress=progress,
        )
    )
    return np.concatenate(pieces) if pieces else np.empty((0, max(context_size, 0)), np.int32)


def iter_packed_contexts(
    documents: Iterable[str],
    encode: Callable[[str], list[int]],
    *,
    context_size: int,
    n_contexts: int,
    bos_token_id: int,
    separator_token_id: int,
    piece_contexts: int = 1024,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Pack tokenized documents into ``n_contexts`` int32 contexts of ``context_size`` tokens, yielded in
    order as ``[piece_contexts, context_size]`` pieces (the last one may be shorter), so that a corpus
    of any size packs in the memory of one piece.

    Every row starts with ``bos_token_id``; the other ``context_size - 1`` positions are filled, in
    order, from the stream ``doc0 + [sep] + doc1 + [sep] + ...`` (empty documents are skipped, and
    a document may run on into the next row). Documents are pulled and encoded one at a time and no
    more are read once the last row is full. Raises SaepipeError if the documents run out first.
    """
    if context_size < 2:
        raise SaepipeError(f"context size {context_size} is too small: use at least 2 (BOS plus one token)")
    if n_contexts < 0:
        raise SaepipeError(f"cannot pack {n_contexts} contexts: ask for a positive number")
    if n_contexts == 0:
        return

    def new_piece(first_context: int) -> np.ndarray:
        piece = np.empty((min(piece_contexts, n_contexts - first_context), context_size), dtype=np.int32)
        piece[:, 0] = bos_token_id
        return piece

    out = new_piece(0)
    sep = np.asarray([separator_token_id], dtype=np.int32)
    done, row, col = 0, 0, 1  # contexts yielded; next position to fill in `out`
    stream_tokens = 0
    first = True
    bar = tqdm(total=n_contexts, unit="ctx", desc="packing contexts", file=sys.stderr, disable=not progress)
    try:
        for doc in documents:
            if not doc:
                continue
            tokens = np.asarray(encode(doc), dtype=np.int32).reshape(-1)
            if tokens.size == 0:
                continue
            for piece in (tokens,) if first else (sep, tokens):
                first = False
                stream_tokens += piece.size
                start = 0
                while start < piece.size:
                    take = min(context_size - col, piece.size - start)
                    out[row, col : col + take] = piece[start : start + take]
                    start += take
                    col += take
                    if col == context_size:
                        row += 1
                        col = 1
                        bar.update(1)
                        if row == len(out):
                            yield out
                            done += row
                            if done == n_contexts:
                                return  # full: do not pull another document
                            out, row = new_piece(done), 0
    finally:
        bar.close()
    raise SaepipeError(
        f"the text source yields only {done + row} contexts of {context_size} tokens ({stream_tokens} tokens); "
        "ask for fewer tokens or use a larger dataset"
    )
