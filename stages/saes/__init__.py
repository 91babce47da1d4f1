"""SAE architectures, one module each (the SAE and its settings), all trained by the loop in stages.train.

A new architecture is one module defining a SparseAutoencoder subclass and its ArchSettings, plus one
line in ARCHITECTURES: its settings become `saepipe train` options and sweep axes by themselves.

Each architecture, and how to add one: docs/architectures.md#adding-an-architecture
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.basics.errors import SaepipeError
from stages.basics.settings import default_of, flag_of, settings_of
from stages.saes.base import ArchSettings, SparseAutoencoder, SparseCode
from stages.saes.batchtopk import BatchTopKSAE
from stages.saes.clt import BatchTopKCrossLayerTranscoder, CrossLayerTranscoder
from stages.saes.crosscoder import CROSSCODER_ACTIVATIONS, crosscoder_class
from stages.saes.jumprelu import JumpReLUSAE
from stages.saes.matching_pursuit import MatchingPursuitSAE
from stages.saes.matryoshka import MatryoshkaSAE
from stages.saes.relu import ReLUSAE
from stages.saes.topk import TopKSAE
from stages.saes.transcoder import ACTIVATIONS, TRANSCODER_ARCHS, transcoder_class

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
    "relu": ReLUSAE,
    "jumprelu": JumpReLUSAE,
    "mp": MatchingPursuitSAE,
}


# Architectures made of several hooks' rows, each with the sparsity rules (`--activation`) it takes.
MULTI_HOOK_ARCHS: dict[str, tuple[str, ...]] = {
    "transcoder": ACTIVATIONS,
    "skip_transcoder": ACTIVATIONS,
    "crosscoder": CROSSCODER_ACTIVATIONS,
    "clt": ("topk", "batchtopk"),
}


def arch_settings() -> dict[str, dataclasses.Field]:
    """Every architecture's settings by name, each once (an inherited one, like k, is one setting)."""
    fields: dict[str, dataclasses.Field] = {}
    for sae in ARCHITECTURES.values():
        for name, field in settings_of(sae.settings_class).items():
            fields.setdefault(name, field)
    return fields


def owners(name: str) -> list[str]:
    """The architectures that take setting `name`."""
    return [arch for arch, sae in ARCHITECTURES.items() if name in settings_of(sae.settings_class)]


def require_arch(arch: str) -> type[SparseAutoencoder]:
    if arch not in ARCHITECTURES:
        known = ", ".join((*ARCHITECTURES, *MULTI_HOOK_ARCHS))
        raise SaepipeError(f"unknown --arch {arch!r}; available: {known}")
    return ARCHITECTURES[arch]


def settings_arch(arch: str, activation: str) -> str:
    """The architecture whose settings (k, l1_coef, ...) a run takes: a multi-hook one's activation's."""
    if arch not in MULTI_HOOK_ARCHS:
        return arch
    if activation not in MULTI_HOOK_ARCHS[arch]:
        raise SaepipeError(
            f"--activation {activation!r} cannot drive --arch {arch}: use one of {', '.join(MULTI_HOOK_ARCHS[arch])}"
        )
    return activation


def sae_class(arch: str, activation: str | None = None) -> type[SparseAutoencoder]:
    """The module class of an architecture; of a multi-hook one, the one made for its activation."""
    if arch not in MULTI_HOOK_ARCHS:
        return require_arch(arch)
    activation = settings_arch(arch, activation)
    if arch == "clt":
        return BatchTopKCrossLayerTranscoder if activation == "batchtopk" else CrossLayerTranscoder
    if arch == "crosscoder":
        return crosscoder_class(ARCHITECTURES, activation)
    return transcoder_class(ARCHITECTURES, activation, skip=arch == "skip_transcoder")


def new_sae(arch: str, activation: str, d_in: int, width: int, settings: ArchSettings, **shape):
    """A fresh SAE of `width` latents (of `width` per layer for a CLT). `shape`: what a multi-hook
    architecture needs beside d_in (a transcoder's d_out; a CLT's d_out and n_layers; a crosscoder's
    hook_widths)."""
    return sae_class(arch, activation).from_settings(d_in, width, settings, **shape)


def settings_for(arch: str, values: dict[str, Any], named: str | None = None) -> ArchSettings:
    """`arch`'s settings from flat values (the CLI's, or a sweep's): its own are taken; another
    architecture's setting is refused unless it is left at its default. `named`: how the user named the
    architecture, when `arch` is a multi-hook one's activation (e.g. "clt --activation topk")."""
    own = settings_of(require_arch(arch).settings_class)
    every = arch_settings()
    for name, value in values.items():
        if name in own:
            continue
        if name not in every:
            raise TypeError(f"no architecture has a setting {name!r}")
        if value != default_of(every[name]):
            raise SaepipeError(
                f"{flag_of(every[name])} does not apply to --arch {named or arch} (it is for {', '.join(owners(name))})"
            )
    return ARCHITECTURES[arch].settings_class(**{k: v for k, v in values.items() if k in own})


def build_sae(config: dict) -> SparseAutoencoder:
    """Rebuild an SAE module (uninitialized weights) from `SparseAutoencoder.config()`."""
    params = {k: v for k, v in config.items() if k not in ("arch", "activation")}
    return sae_class(config["arch"], config.get("activation"))(**params)


__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "MULTI_HOOK_ARCHS",
    "TRANSCODER_ARCHS",
    "ArchSettings",
    "BatchTopKSAE",
    "CrossLayerTranscoder",
    "JumpReLUSAE",
    "MatchingPursuitSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SparseAutoencoder",
    "SparseCode",
    "TopKSAE",
    "arch_settings",
    "build_sae",
    "new_sae",
    "owners",
    "settings_arch",
    "settings_for",
]
