"""Files and folders the tests read: the repository's own, and what a store holds on disk."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/helpers/files.py is two folders down


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (a store), by its relative path: two trees are equal file for file, with no
    stray file in either."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rewrite_checksummed(chunk: Path, data: bytes) -> None:
    """Replace a checksummed chunk file's bytes, checksum and all, as a tool that rewrites chunks would: the
    chunk then passes its checksum, and only what verify, training or eval know beyond it can find the change."""
    import google_crc32c

    chunk.write_bytes(data + google_crc32c.value(data).to_bytes(4, "little"))


def poison_chunk(chunk: Path, values: int, value: float) -> None:
    """Set the first `values` fp16 values of a raw checksummed chunk file to `value` (inf, NaN), checksummed
    anew (rewrite_checksummed)."""
    import numpy as np

    rows = np.frombuffer(chunk.read_bytes()[:-4], np.float16).copy()
    rows[:values] = value
    rewrite_checksummed(chunk, rows.tobytes())
