"""Click options built from settings (stages.basics.settings): an option's flag, type, default and help
all come from its config field, so the CLI and the Python API cannot drift apart."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import click

from stages.basics.errors import SaepipeError
from stages.basics.settings import default_of, flag_of, settings_of

_TYPES = {"int": int, "float": float, "str": str}


def option_for(field: dataclasses.Field, **overrides) -> Callable:
    """The click option of one setting; `overrides` replace what the field would give."""
    meta = field.metadata
    flag = flag_of(field)
    kwargs: dict = {"help": meta["help"], "default": default_of(field)}
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        kwargs["required"] = True  # a setting without a default: the command cannot run without it
    annotation = str(field.type).replace(" ", "").removesuffix("|None")
    if annotation == "bool":
        kwargs |= {"is_flag": True, "flag_value": not meta["inverted"], "show_default": False}
        if field.name == "progress":
            kwargs["callback"] = _quiet_libraries_unless_progress
    elif annotation == "tuple[int,...]":  # given comma-separated: --groups 512,2048,4096
        kwargs |= {"type": str, "callback": _comma_separated_integers(flag, meta)}
        kwargs["default"] = None if kwargs["default"] in (None, ()) else ",".join(map(str, kwargs["default"]))
    elif annotation.startswith("tuple["):  # repeated: --hook A --hook B
        kwargs |= {"multiple": True, "type": _TYPES[annotation.removeprefix("tuple[").split(",")[0]]}
    elif meta["choices"]:
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif annotation in _TYPES:
        kwargs["type"] = _TYPES[annotation]
    if meta["shown_default"] is not None:
        kwargs["show_default"] = meta["shown_default"]
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    return click.option(flag, field.name, **(kwargs | overrides))


def _quiet_libraries_unless_progress(ctx: click.Context, param: click.Parameter, progress: bool) -> bool:
    """--no-progress silences the libraries' own bars too (transformers' "Loading weights", the hub's
    downloads): their switch is read when transformers is imported, which happens later, when a model
    loads; one already imported is switched off directly."""
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        for module, switch_off in (
            ("huggingface_hub", lambda m: m.utils.disable_progress_bars()),
            ("transformers", lambda m: m.utils.logging.disable_progress_bar()),
        ):
            if module in sys.modules:
                switch_off(sys.modules[module])
    return progress


def _comma_separated_integers(flag: str, meta) -> Callable:
    def parse(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[int, ...] | None:
        if text is None or not text.strip():
            return None if text is None else ()
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise SaepipeError(
                f"{flag} must be comma-separated {meta['items']} like {meta['metavar']}, got {text!r}"
            ) from None

    return parse


def options(config_cls, *names: str, **overrides: dict) -> Callable:
    """A decorator adding the options of `config_cls`'s settings `names`, listed by --help in that
    order. `overrides[name]` replaces keyword arguments of one option."""
    fields = settings_of(config_cls)
    unknown = [name for name in names if name not in fields]
    assert not unknown, f"{config_cls.__name__} has no setting {unknown}"

    def decorate(command: Callable) -> Callable:
        for name in reversed(names):  # click lists a command's options in the reverse order of decoration
            command = option_for(fields[name], **overrides.get(name, {}))(command)
        return command

    return decorate
