"""The user cache folder: converted models and collect's staging stores live there."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live: $SAEPIPE_CACHE if set, else ~/.cache/saepipe."""
    env = os.environ.get("SAEPIPE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saepipe"
