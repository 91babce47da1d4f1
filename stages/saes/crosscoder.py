"""Crosscoders: one latent space read from and written to several hooks at once (Lindsey et al., "Sparse
Crosscoders for Cross-Layer Features and Model Diffing", Anthropic 2024; the acausal variant).

    f = σ(Σ_h x_h W_enc,h + b_enc),   x̂_h = f W_dec,h + b_dec,h

With the hooks' rows side by side, x = [x_1 | ... | x_H], that is one SAE of width Σ d_h: W_enc is the
W_enc,h stacked, each latent's decoder row the W_dec,h side by side. So a crosscoder is any of our SAE
activations (topk, batchtopk, jumprelu, relu) trained on the joined rows, each hook in its own recorded
normalization (collect gives every hook its own scale, so no hook dominates the loss by its norm). The
unit-norm (or, for relu, norm-weighted) constraint applies to a latent's whole row across the hooks:
Anthropic's L1 sums the per-hook norms instead, a difference that only the relu crosscoder sees.

A training batch is the tuple of the hooks' row-aligned batches, or those side by side.

The planted-feature test: docs/architectures.md#crosscoders (measurements: docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

import torch

from stages.basics.errors import require
from stages.saes.base import SparseAutoencoder, TrainContext
from stages.saes.composed import composed_class
from stages.saes.io import HookArgs, HookIO, several_hooks_from_record, several_hooks_record

CROSSCODER_ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


class CrosscoderMixin:
    """Turns an SAE class into a crosscoder of the same activation over hooks of widths `hook_widths`."""

    saelens_format = None

    def __init__(self, d_in: int, d_sae: int, *args, hook_widths, **kwargs):
        self.hook_widths = tuple(int(w) for w in hook_widths)
        if sum(self.hook_widths) != d_in:
            raise ValueError(f"d_in {d_in} is not the sum of the hooks' widths {self.hook_widths}")
        super().__init__(d_in, d_sae, *args, **kwargs)

    @classmethod
    def check_hook_args(cls, args: HookArgs) -> None:
        require(
            len(args.hooks) >= 2 and len(set(args.hooks)) == len(args.hooks),
            "--arch crosscoder reads one latent space from several hooks: pass two or more different --hook",
        )

    @classmethod
    def hook_io(cls, args: HookArgs) -> HookIO:
        return HookIO(tuple(args.hooks), tuple(args.hooks))

    @classmethod
    def shape_for(cls, io: HookIO, width) -> tuple[int, dict]:
        """One SAE over the hooks' rows side by side."""
        widths = [width(hook) for hook in io.reads]
        return sum(widths), {"hook_widths": widths}

    @classmethod
    def hook_record(cls, io: HookIO, width, normalization) -> dict:
        """Every hook, each with its own normalization."""
        return several_hooks_record(io, normalization)

    @classmethod
    def recorded_io(cls, record: dict) -> tuple[HookIO, dict[str, dict]]:
        return several_hooks_from_record(record)

    def widths_at(self, io: HookIO) -> dict[str, int]:
        """Its rows are its hooks' side by side."""
        return dict(zip(io.reads, self.hook_widths))

    @staticmethod
    def joined(batch) -> torch.Tensor:
        return torch.cat(batch, dim=1) if isinstance(batch, tuple) else batch

    def target_rows(self, batch) -> torch.Tensor:
        return self.joined(batch)

    def training_loss(self, batch, ctx: TrainContext, target: torch.Tensor | None = None):
        return super().training_loss(self.joined(batch), ctx)

    def saelens_export(self):
        raise ValueError("SAELens has no crosscoder format")

    def config(self) -> dict:
        return {**super().config(), "activation": self.activation, "hook_widths": list(self.hook_widths)}


def crosscoder_class(activations: dict[str, type[SparseAutoencoder]], activation: str) -> type:
    base = activations[activation]
    return composed_class(CrosscoderMixin, base, "crosscoder", f"{base.__name__.removesuffix('SAE')}Crosscoder")
