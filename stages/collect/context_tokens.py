"""The token ids of the contexts a collect runs the model over, without holding the corpus in memory.

A block's contexts are a random sample of the whole corpus (the block plan shuffles them), so reading
them from the store's compressed token chunks would decode most chunks for every block. Instead the
tokens are decoded once, chunk by chunk, into an anonymous scratch file (4 bytes a token, deleted when
closed or when the process dies), and each block reads its contexts from it with one `pread` each: the
process holds one block's tokens, the page cache the rest."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import zarr

from store_schema import schema
from store_schema.header import StoreHeader


class ContextTokens:
    def __init__(self, tokens: zarr.Array, drop_first: int, excluded_tokens: list[int]):
        self.n_contexts, self.context_size = tokens.shape
        self.drop_first, self.excluded_tokens = drop_first, excluded_tokens
        self._file = tempfile.TemporaryFile(prefix="saepipe-tokens-")
        # stored positions per context (before the outlier filter): the progress bar's total, 4 bytes a context
        self.stored_counts = np.zeros(self.n_contexts, np.int32)
        step = tokens.chunks[0]
        for first in range(0, self.n_contexts, step):
            piece = tokens[first : first + step]
            self._file.write(np.ascontiguousarray(piece, dtype=np.int32).tobytes())
            self.stored_counts[first : first + len(piece)] = self.stored_mask(piece).sum(axis=1)
        self._file.flush()

    @classmethod
    def of_store(cls, group: zarr.Group, header: StoreHeader) -> ContextTokens:
        return cls(group[schema.TOKENS], header.first_stored_position, list(header.excluded_tokens))

    def stored_mask(self, tokens: np.ndarray) -> np.ndarray:
        """Bool [n, C]: the positions of these contexts whose activations the store keeps."""
        return schema.stored_positions(tokens, self.drop_first, self.excluded_tokens)

    def read(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The contexts' tokens (int32 [n, C]) and their stored-position mask."""
        out = np.empty((len(contexts), self.context_size), np.int32)
        row_bytes, fd = self.context_size * 4, self._file.fileno()
        for row, context in zip(out, contexts):
            if not 0 <= context < self.n_contexts or os.preadv(fd, [row], int(context) * row_bytes) != row_bytes:
                raise IndexError(f"context {context} is not one of the store's {self.n_contexts}")
        return out, self.stored_mask(out)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ContextTokens:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
