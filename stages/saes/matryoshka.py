"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", 2025): a BatchTopK SAE whose latents form nested prefixes
m_1 < m_2 < … < m_G = d_sae (`--groups`), the loss summing every prefix's reconstruction error, so that
the first latents learn the most general directions. Inference, threshold and export are BatchTopKSAE's.

Recipe, deviations and settings: docs/architectures.md#matryoshka
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.basics.errors import SaepipeError
from stages.basics.settings import refuse_unless, setting
from stages.saes.batchtopk import BatchTopKSAE
from stages.saes.topk import TopKSettings


def groups_problem(groups, width: int) -> str | None:
    """Why `groups` cannot be the prefix sizes of a `width`-latent matryoshka SAE (None: they can)."""
    shown = ",".join(str(g) for g in groups)
    if not groups:
        return "must name at least one prefix size"
    if any(g <= 0 for g in groups):
        return f"must be positive, got {shown}"
    if any(g > width for g in groups):
        return f"must not exceed --width {width}, got {shown}"
    if any(b <= a for a, b in zip(groups, groups[1:])):
        return f"must be strictly increasing, got {shown}"
    if groups[-1] != width:
        return f"must end at --width {width}, got {shown}"
    return None


@dataclass
class MatryoshkaSettings(TopKSettings):
    groups: tuple[int, ...] | None = setting(
        None, "increasing prefix sizes ending at --width", metavar="512,2048,4096", shown_default="none: required"
    )

    def check(self, width: int) -> None:
        super().check(width)
        if self.groups is None:
            example = f"{width // 8},{width // 2},{width}" if width >= 8 else str(width)
            raise SaepipeError(
                f"--arch matryoshka needs --groups: increasing prefix sizes ending at --width {width}, e.g. {example}"
            )
        problem = groups_problem(tuple(self.groups), width)
        refuse_unless(problem is None, self, "groups", problem or "")


class MatryoshkaSAE(BatchTopKSAE):
    arch = "matryoshka"
    settings_class = MatryoshkaSettings

    def __init__(self, d_in: int, d_sae: int, k: int, groups, aux_k: int | None = None, aux_coef: float = 1 / 32):
        groups = tuple(int(g) for g in groups)
        problem = groups_problem(groups, d_sae)
        if problem:
            raise ValueError(f"groups {problem}".replace("--width", "d_sae"))
        self.groups = groups
        super().__init__(d_in, d_sae, k, aux_k, aux_coef)

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: MatryoshkaSettings, **extra) -> MatryoshkaSAE:
        return cls(d_in, width, settings.resolved_k, settings.groups, settings.aux_k, settings.aux_coef, **extra)

    @property
    def prefixes(self) -> tuple[int, ...]:
        return self.groups

    def config(self) -> dict:
        return {**super().config(), "groups": list(self.groups)}
