"""Plain text <-> token ids, the one tokenization interface the project uses (no special tokens added)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from stages.basics.errors import SaepipeError


@runtime_checkable
class TextTokenizer(Protocol):
    """The tokenization the project uses: plain text <-> ids, no special tokens added by encode."""

    name: str
    bos_token_id: int
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; id 256 is BOS (and EOS). For the tiny-random test model."""

    name = "byte-level"
    bos_token_id = 256
    eos_token_id: int | None = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTextTokenizer:
    """Adapts a transformers tokenizer to TextTokenizer (encode never adds BOS/EOS)."""

    def __init__(self, tokenizer: Any, name: str | None = None):
        self.hf_tokenizer = tokenizer
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = eos if eos is not None else tokenizer.pad_token_id
        if bos is None:
            raise SaepipeError(f"tokenizer of '{self.name}' has no BOS, EOS or pad token to start contexts with")
        self.bos_token_id = int(bos)
        self.eos_token_id = None if eos is None else int(eos)
        self.vocab_size = len(tokenizer)
        # Documents are encoded whole and cut into contexts afterwards; silence the "longer than the
        # model's maximum length" warning, which does not apply.
        tokenizer.model_max_length = sys.maxsize

    def encode(self, text: str) -> list[int]:
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def __repr__(self) -> str:
        return f"HFTextTokenizer({self.name!r}, vocab_size={self.vocab_size})"
