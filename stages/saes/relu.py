"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates – April 2024": how we
train SAEs), optionally with ghost grads for dead latents (Anthropic, "Circuits Updates – January 2024").

    f = ReLU(pre),   loss = ‖x − x̂‖² / mse_scale + λ(t) · Σ_i f_i ‖W_dec,i‖

The decoder rows are free (no unit-norm constraint): the penalty weighs each code by its row's norm.

Recipe, default λ and ghost grads: docs/architectures.md#relu (measurements: docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.basics import distributed
from stages.basics.settings import refuse_unless, setting
from stages.saes.base import (
    ArchExport,
    ArchSettings,
    DenseCode,
    SparseAutoencoder,
    TrainContext,
    reconstruction_metrics,
)

# The April-2024 recipe's λ, on inputs with E‖x‖² = d; ours is this / d_in, our loss being the recipe's / d
# (docs/architectures.md#relu).
DEFAULT_L1_COEF_TIMES_D = 5.0

# The recipe's initial decoder norm: small first reconstructions, grown by training rather than undone.
INIT_DECODER_NORM = 0.1


def default_l1_coef(d_in: int) -> float:
    return DEFAULT_L1_COEF_TIMES_D / d_in


@dataclass
class ReLUSettings(ArchSettings):
    l1_coef: float | None = setting(
        None, "L1 coefficient (sparsity penalty weighted by decoder norms)", shown_default="5 / d_in"
    )
    l1_warmup_frac: float = setting(0.05, "share of training over which L1 ramps up")
    ghost_grads: bool = setting(False, "ghost gradients for dead latents (after the dead window)")

    def check(self, width: int) -> None:
        refuse_unless(self.l1_coef is None or self.l1_coef >= 0, self, "l1_coef", f"must be >= 0, got {self.l1_coef}")
        refuse_unless(
            0 <= self.l1_warmup_frac <= 1, self, "l1_warmup_frac", f"must be in [0, 1], got {self.l1_warmup_frac}"
        )


class ReLUSAE(SparseAutoencoder):
    arch = "relu"
    settings_class = ReLUSettings
    unit_norm_decoder = False  # the L1 term is weighted by decoder norms instead

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        l1_coef: float | None = None,
        l1_warmup_frac: float = 0.05,
        ghost_grads: bool = False,
    ):
        l1_coef = default_l1_coef(d_in) if l1_coef is None else float(l1_coef)
        if not l1_coef >= 0:
            raise ValueError(f"l1_coef must be >= 0, got {l1_coef}")
        if not 0 <= l1_warmup_frac <= 1:
            raise ValueError(f"l1_warmup_frac must be in [0, 1], got {l1_warmup_frac}")
        self.l1_coef, self.l1_warmup_frac, self.ghost_grads = l1_coef, float(l1_warmup_frac), bool(ghost_grads)
        super().__init__(d_in, d_sae)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The recipe's init: random decoder directions of norm INIT_DECODER_NORM, encoder = decoder transpose."""
        super().reset_parameters(generator)
        self.W_dec.mul_(INIT_DECODER_NORM)
        if self.transcodes:  # encoder and decoder in different spaces: the encoder is scaled alike
            self.W_enc.mul_(INIT_DECODER_NORM)
        else:
            self.W_enc.copy_(self.W_dec.t())

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: ReLUSettings, **extra) -> ReLUSAE:
        return cls(d_in, width, settings.l1_coef, settings.l1_warmup_frac, settings.ghost_grads, **extra)

    def l1_coef_at(self, progress: float) -> float:
        """λ at a fraction `progress` of training: linear from 0 over the first l1_warmup_frac, then l1_coef."""
        if self.l1_warmup_frac <= 0:
            return self.l1_coef
        return self.l1_coef * min(1.0, progress / self.l1_warmup_frac)

    def encode(self, x: torch.Tensor) -> DenseCode:
        return DenseCode(self.pre_acts(x).relu())

    def training_loss(
        self, x: torch.Tensor, ctx: TrainContext, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`target`: what the decoder reconstructs (a transcoder's output rows); x itself by default."""
        target = x if target is None else target
        code = self.encode(x)
        recon = self.decode(code)
        sq_err = (recon - target).pow(2).sum(dim=-1)
        mse_term = sq_err.mean() / ctx.mse_scale
        sparsity = (code.values * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        loss = mse_term + self.l1_coef_at(ctx.progress) * sparsity
        aux = torch.zeros((), device=x.device)
        if self.ghost_grads:
            aux = self.ghost_loss(x, target - recon, mse_term, ctx.dead)
            loss = loss + aux
        metrics = reconstruction_metrics(target, sq_err, code, self.d_sae, loss, aux)
        metrics["sparsity_loss"] = sparsity.detach()
        return loss, metrics

    def ghost_loss(
        self, x: torch.Tensor, residual: torch.Tensor, mse_term: torch.Tensor, dead: torch.Tensor | None
    ) -> torch.Tensor:
        """The ghost-grads term of the January-2024 recipe: the dead latents' exp'd pre-activations, decoded
        and rescaled to half the residual's norm, fit that residual; the loss is rescaled to equal the main
        MSE term (docs/architectures.md#ghost-grads). Zero when no latent is dead."""
        if dead is None or not bool(dead.any()):
            return torch.zeros((), device=x.device)
        idx = dead.nonzero().squeeze(1)
        # b_dec detached: ghost grads move only the dead latents' weights.
        pre = ((x - self.b_dec.detach()) @ self.W_enc[:, idx] + self.b_enc[idx]).float()
        # Shifted by each row's max (detached): the per-row rescale below cancels it, and exp cannot overflow.
        acts = torch.exp(pre - pre.detach().amax(dim=1, keepdim=True))
        ghost = acts @ self.W_dec[idx].float()
        r = residual.detach().float()
        rescale = r.norm(dim=1, keepdim=True) / (2 * ghost.norm(dim=1, keepdim=True).clamp_min(1e-12))
        ghost = ghost * rescale.detach()
        ghost_sq = (ghost - r).pow(2).sum(dim=-1).mean()
        # The rescale is a ratio of batch means: global ones under data parallelism.
        mse, ghost_mean = (distributed.global_mean(t.detach().float()) for t in (mse_term, ghost_sq))
        return ghost_sq * (mse / ghost_mean.clamp_min(1e-12))

    def saelens_export(self) -> ArchExport:
        # SAELens's "standard" SAE: ReLU(pre) decoded by W_dec, nothing else at inference; exactly ours.
        # Its weights are taken as they are (decoder rows not unit-norm); SAELens's fold_W_dec_norm can
        # move the norms into the encoder if a user wants unit-norm rows.
        return ArchExport("standard")

    def config(self) -> dict:
        return {
            **super().config(),
            "l1_coef": self.l1_coef,
            "l1_warmup_frac": self.l1_warmup_frac,
            "ghost_grads": self.ghost_grads,
        }
