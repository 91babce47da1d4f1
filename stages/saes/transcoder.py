"""Transcoders: a sparse code read from one hook that reconstructs another (Dunefsky, Chlenski & Nanda,
"Transcoders Find Interpretable LLM Feature Circuits", 2024; the skip transcoder of Paulo, Shabalin &
Belrose, "Transcoders Beat Sparse Autoencoders for Interpretability", 2025).

    transcoder:       ŷ = f(x W_enc + b_enc) W_dec + b_dec
    skip transcoder:  ŷ = f(x W_enc + b_enc) W_dec + b_dec + x W_skip

x is the input hook's row (an MLP's input after its norm), y the output hook's (the MLP's output), and f
one of the SAE activations (topk, batchtopk, jumprelu, relu), trained with that activation's own loss,
AuxK, thresholds and schedules, against y instead of x. The encoder reads x as it is: b_dec lives in the
output space, so nothing is subtracted before encoding (as SAELens's Transcoder). W_skip starts at zero.

A training batch is the pair (x, y) of row-aligned batches of the two hooks (stages.train reads them
together), or the two side by side, [x | y] (the initialization sample).

Formulas: docs/architectures.md#transcoders (measurements: docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

import torch
from torch import nn

from stages.basics import distributed
from stages.basics.errors import require
from stages.saes.base import SparseAutoencoder, TrainContext
from stages.saes.composed import composed_class
from stages.saes.io import HookArgs, HookIO

# The activations a transcoder can use: the SAEs whose encoder is (x W_enc + bias) followed by a sparsity
# rule, and whose training loss takes a target.
ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
TRANSCODER_ARCHS = ("transcoder", "skip_transcoder")


class TranscoderMixin:
    """Turns an SAE class into a transcoder of the same activation (see transcoder_class)."""

    transcodes = True
    skip = False
    saelens_format = "transcoder"
    circuit_tracer_format = "transcoder"

    def __init__(self, d_in: int, d_sae: int, *args, d_out: int, **kwargs):
        self.d_out = int(d_out)  # read by SparseAutoencoder.__init__ to size the decoder
        super().__init__(d_in, d_sae, *args, **kwargs)
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out))

    activation = ""  # set on each generated class: the SAE architecture whose sparsity rule it uses

    hook_options = "--in-hook/--out-hook"

    @classmethod
    def check_hook_args(cls, args: HookArgs) -> None:
        require(
            args.in_hook is not None and args.out_hook is not None,
            f"--arch {cls.arch} reads one hook and reconstructs another: pass --in-hook and --out-hook "
            f"(e.g. --in-hook blocks.5.mlp.hook_in --out-hook blocks.5.hook_mlp_out)",
        )
        require(
            args.in_hook != args.out_hook,
            f"--in-hook and --out-hook are both {args.in_hook}: a transcoder maps one hook to another "
            f"(for an SAE of one hook, use --arch {cls.activation} --hook {args.in_hook})",
        )

    @classmethod
    def hook_io(cls, args: HookArgs) -> HookIO:
        return HookIO((args.in_hook,), (args.out_hook,))

    @classmethod
    def shape_for(cls, io: HookIO, width) -> tuple[int, dict]:
        return width(io.reads[0]), {"d_out": width(io.writes[0])}

    @classmethod
    def hook_record(cls, io: HookIO, width, normalization) -> dict:
        """The input's normalization is cfg.json's `normalization`; the output's is recorded beside it."""
        (in_hook,), (out_hook,) = io.reads, io.writes
        return {
            "in_hook": in_hook,
            "out_hook": out_hook,
            "d_out": width(out_hook),
            "out_normalization": normalization(out_hook),
        }

    @classmethod
    def recorded_io(cls, record: dict) -> tuple[HookIO, dict[str, dict]]:
        in_hook, out_hook = record["in_hook"], record["out_hook"]
        return HookIO((in_hook,), (out_hook,)), {
            in_hook: record["normalization"],
            out_hook: record["out_normalization"],
        }

    def encoder_bias(self) -> torch.Tensor:
        return self.b_enc  # the input is encoded as it is: b_dec is an output-space bias

    def target_rows(self, batch) -> torch.Tensor:
        return batch[1] if isinstance(batch, tuple) else batch[..., self.d_in :]

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | None:
        return x @ self.W_skip if self.skip else None

    def output(self, x: torch.Tensor, code) -> torch.Tensor:
        y_hat = self.decode(code)
        skip = self.skip_term(x)
        return y_hat if skip is None else y_hat + skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output hook's rows predicted from the input hook's x."""
        return self.output(x, self.encode(x))

    def training_loss(self, batch: torch.Tensor, ctx: TrainContext, target: torch.Tensor | None = None):
        """The activation's own loss on (x, y): its code of x reconstructs y (minus the skip path's
        prediction, whose weights get their gradient through that difference)."""
        x, y = batch if isinstance(batch, tuple) else (batch[..., : self.d_in], batch[..., self.d_in :])
        skip = self.skip_term(x)
        loss, metrics = super().training_loss(x, ctx, target=y if skip is None else y - skip)
        if skip is not None:  # fve against y itself: the residual target's variance is not y's
            with torch.no_grad():
                sq_err = metrics["mse"] * self.d_out
                variance = distributed.global_mean((y - distributed.global_mean(y.mean(dim=0))).pow(2).sum(-1).mean())
                metrics["fve"] = 1 - distributed.global_mean(sq_err) / variance
        return loss, metrics

    def saelens_export(self):
        raise ValueError(f"{self.arch} runs export through stages.train.transcoder_export, not as SAEs")

    def saelens_export_of_activation(self):
        """How the activation alone exports to SAELens (its architecture name and extra tensors)."""
        return super().saelens_export()

    def config(self) -> dict:
        return {**super().config(), "activation": self.activation, "d_out": self.d_out}


class SkipTranscoderMixin(TranscoderMixin):
    skip = True


def transcoder_class(activations: dict[str, type[SparseAutoencoder]], activation: str, skip: bool) -> type:
    """The transcoder (or skip transcoder) class of one activation."""
    base = activations[activation]
    name = f"{base.__name__.removesuffix('SAE')}{'Skip' if skip else ''}Transcoder"
    return composed_class(SkipTranscoderMixin if skip else TranscoderMixin, base, TRANSCODER_ARCHS[skip], name)
