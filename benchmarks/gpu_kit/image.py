"""What the lent GPU machines' image holds (image.txt): package names, and versions where known."""

from __future__ import annotations

import re
from pathlib import Path

IMAGE_LIST = Path(__file__).with_name("image.txt")


def normalized(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> list[tuple[str, str | None]]:
    """(normalized name, version or None) of each `name[==version]` line of a requirements-style file
    (image.txt, needs.txt, constraints.txt), comments and blank lines left out."""
    entries = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            entries.append((normalized(name.strip()), version.strip() or None))
    return entries


def image_pins() -> dict[str, str]:
    """The image's packages whose version is known: name -> version."""
    return {name: version for name, version in read_requirements(IMAGE_LIST) if version}


IMAGE_PACKAGES = frozenset(name for name, _ in read_requirements(IMAGE_LIST))
