"""Files and folders the tests read: the repository's own, and what a store holds on disk."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/helpers/files.py is two folders down


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (a store), by its relative path: two trees are equal file for file, with no
    stray file in either."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
