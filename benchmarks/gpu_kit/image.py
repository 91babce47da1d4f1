"""What the lent GPU machines' image holds (image.txt): package names, and versions where known."""

from __future__ import annotations

import re
from pathlib import Path

IMAGE_LIST = Path(__file__).with_name("image.txt")


def normalized(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _entries() -> list[tuple[str, str | None]]:
    entries = []
    for line in IMAGE_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            entries.append((normalized(name), version or None))
    return entries


def image_pins() -> dict[str, str]:
    """The image's packages whose version is known: name -> version."""
    return {name: version for name, version in _entries() if version}


IMAGE_PACKAGES = frozenset(name for name, _ in _entries())
