"""Settings: dataclass fields that carry their own help text.

A setting's default and what it means are written once, on its config's field; the CLI builds its
options from those fields (pipeline/commands/options.py), and a Python user reads the same text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any

from stages.basics.errors import SaepipeError


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Any = MISSING,
    flag: str | None = None,
    inverted: bool = False,
    choices: tuple[str, ...] | None = None,
    shown_default: str | None = None,
    metavar: str | None = None,
    items: str = "integers",
) -> Any:
    """A dataclass field with its help text. For the CLI: `flag` names the option when it is not
    --field-name; `inverted` makes that option a flag that sets the field to False (--no-progress);
    `choices` lists the values it takes; `shown_default` is what --help shows when the default is
    None (a value resolved later, e.g. from the store); a tuple of integers is given comma-separated,
    like `metavar`, and `items` names them in the message refusing anything else."""
    metadata = {
        "help": help,
        "flag": flag,
        "inverted": inverted,
        "choices": choices,
        "shown_default": shown_default,
        "metavar": metavar,
        "items": items,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The CLI option of a setting: its own flag, or --field-name."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def settings_of(cls) -> dict[str, dataclasses.Field]:
    """A config class's settings (the fields that carry help text), by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def default_of(field: dataclasses.Field) -> Any:
    """The value a setting takes when it is not given."""
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None if field.default is MISSING else field.default


DEVICE_HELP = "auto, cpu, cuda or cuda:N"
PROGRESS_HELP = "no progress bars"


def device_setting() -> Any:
    """The torch device a stage runs on (every stage has one)."""
    return setting("auto", DEVICE_HELP)


def progress_setting() -> Any:
    """Whether long work shows progress bars (off with --no-progress)."""
    return setting(True, PROGRESS_HELP, flag="--no-progress", inverted=True)


def refuse_unless(ok: bool, config, name: str, problem: str) -> None:
    """Raise SaepipeError unless `ok`, naming setting `name` of `config` as the user gave it (its CLI
    flag): refuse_unless(k > 0, settings, "k", "must be positive") -> '--k must be positive'."""
    if not ok:
        field = next(f for f in dataclasses.fields(config) if f.name == name)
        raise SaepipeError(f"{flag_of(field)} {problem}")
