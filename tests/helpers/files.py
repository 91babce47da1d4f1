"""Files and folders the tests read: the repository's own, and what a store holds on disk."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/helpers/files.py is two folders down
