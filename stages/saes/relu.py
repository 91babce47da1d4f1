"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates – April 2024": how we
train SAEs), optionally with ghost grads for dead latents (Anthropic, "Circuits Updates – January 2024").

    f = ReLU(pre),   loss = ‖x − x̂‖² / mse_scale + λ(t) · Σ_i f_i ‖W_dec,i‖

The decoder rows are *not* constrained to unit norm (`unit_norm_decoder = False`): the penalty weighs each
code by its row's norm, so shrinking a code while growing its decoder row buys nothing, and no
projection or renormalization is needed. λ ramps linearly from 0 to `l1_coef` over the first
`l1_warmup_frac` of training. Initialization as in the recipe: random decoder directions with norm 0.1
(INIT_DECODER_NORM) and the encoder equal to the decoder's transpose, so the first reconstructions are
small (≈ 0.01·(d_sae/2d_in)·x) and training grows features from there rather than first undoing a large
overshoot (with unit-norm rows and W_enc = W_decᵀ the planted-feature benchmark recovered 0-1% of
features instead of 97%). The recipe also clips the gradient norm to 1; the shared training loop does
not clip, and the benchmark did not need it.

Default λ. The recipe's loss is ‖x − x̂‖² + λ_A Σ f_i‖W_dec,i‖ on inputs scaled so that E‖x‖² = d, with
λ_A = 5. Our loss divides the squared error by mse_scale = E‖x̂ − E x̂‖², which is ≈ d under our
normalization (center-scale / token: E‖x̂‖² ≈ d, centered); dividing the recipe's whole loss by d gives
ours with λ = λ_A / d. So `l1_coef=None` resolves to DEFAULT_L1_COEF_TIMES_D / d_in = 5 / d_in (0.0087
for d = 576, 0.0022 for d = 2304), recorded in `config()` as the number used. Stores with normalization
`none` are on an arbitrary scale: pass --l1-coef (the L1 term scales like ‖x‖ while the MSE term is
scale-free, so the right λ scales like 1 / ‖x‖).

Ghost grads (`ghost_grads=True`; off by default, as the April-2024 recipe itself does without them),
following the January-2024 recipe, only for the latents `ctx.dead`
marks (dead for the loop's dead-latent window; nothing before that):
  1. r = x − x̂, the main reconstruction's residual, detached;
  2. the dead latents' pre-activations are passed through exp instead of ReLU and decoded by their own
     decoder rows: g = exp(pre_dead) W_dec[dead];
  3. g is rescaled per row to half the residual's norm, with the factor ‖r‖ / (2‖g‖) detached;
  4. the ghost loss ‖g − r‖² (batch mean) is multiplied by (main MSE term / ghost loss), detached, so
     its value equals the main MSE term while its gradient still points where the dead latents should
     go; it is added to the loss and reported as `aux_loss`.
The dead pre-activations are computed with b_dec detached, so ghost grads move only the dead latents'
encoder columns, encoder biases and decoder rows (b_dec and live latents are untouched). Each row's
exp is taken after subtracting that row's (detached) maximum dead pre-activation: because step 3
rescales each row by a detached factor, that shift changes neither the loss nor any gradient, and
exp cannot overflow.
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

DEFAULT_L1_COEF_TIMES_D = 5.0  # the April-2024 recipe's λ; ours is this / d_in (see the module docstring)


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
        self.W_enc.copy_(self.W_dec.t())

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: ReLUSettings) -> ReLUSAE:
        return cls(d_in, width, settings.l1_coef, settings.l1_warmup_frac, settings.ghost_grads)

    def l1_coef_at(self, progress: float) -> float:
        """λ at a fraction `progress` of training: linear from 0 over the first l1_warmup_frac, then l1_coef."""
        if self.l1_warmup_frac <= 0:
            return self.l1_coef
        return self.l1_coef * min(1.0, progress / self.l1_warmup_frac)

    def encode(self, x: torch.Tensor) -> DenseCode:
        return DenseCode(self.pre_acts(x).relu())

    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        code = self.encode(x)
        recon = self.decode(code)
        sq_err = (recon - x).pow(2).sum(dim=-1)
        mse_term = sq_err.mean() / ctx.mse_scale
        sparsity = (code.values * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        loss = mse_term + self.l1_coef_at(ctx.progress) * sparsity
        aux = torch.zeros((), device=x.device)
        if self.ghost_grads:
            aux = self.ghost_loss(x, x - recon, mse_term, ctx.dead)
            loss = loss + aux
        metrics = reconstruction_metrics(x, sq_err, code, self.d_sae, loss, aux)
        metrics["sparsity_loss"] = sparsity.detach()
        return loss, metrics

    def ghost_loss(
        self, x: torch.Tensor, residual: torch.Tensor, mse_term: torch.Tensor, dead: torch.Tensor | None
    ) -> torch.Tensor:
        """The ghost-grads term (see the module docstring); zero when no latent is dead."""
        if dead is None or not bool(dead.any()):
            return torch.zeros((), device=x.device)
        idx = dead.nonzero().squeeze(1)
        pre = ((x - self.b_dec.detach()) @ self.W_enc[:, idx] + self.b_enc[idx]).float()
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
