"""`--dataset synthetic-text`: an endless, deterministic stream of made-up words, generated as fast as
collect can pack it, so that a collect of any size (100M tokens and more) has text without a download.
Paired with `--model synthetic` it measures collect's own costs at scale; it carries no meaning."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SYNTHETIC_TEXT = "synthetic-text"
_DOCUMENT_CHARS = 16_384
_LETTERS = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)


def synthetic_documents(seed: int = 0) -> Iterator[str]:
    """Documents of `_DOCUMENT_CHARS` ASCII characters: lowercase words of 1-9 letters between spaces."""
    rng = np.random.default_rng([seed, 0x7E87])
    while True:
        chars = _LETTERS[np.minimum(rng.geometric(0.15, _DOCUMENT_CHARS), len(_LETTERS)) - 1]
        chars[rng.random(_DOCUMENT_CHARS) < 0.18] = ord(" ")
        yield chars.tobytes().decode("ascii")
