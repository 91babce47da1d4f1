"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders"): keep the k largest
pre-activations per row, ReLU them, decode sparsely. Dead latents are revived by the AuxK loss: the
top `aux_k` dead latents reconstruct the main reconstruction's residual.

Recipe and formulas: docs/architectures.md#topk
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.basics import distributed
from stages.basics.settings import refuse_unless, setting
from stages.saes.base import (
    ArchExport,
    ArchSettings,
    SparseAutoencoder,
    SparseCode,
    TrainContext,
    reconstruction_metrics,
    top_pre_acts,
)

DEFAULT_K = 32


@dataclass
class KSettings(ArchSettings):
    """The active latents per token of the architectures that take a k (the TopK family, matching pursuit)."""

    k: int | None = setting(None, "active latents per token", shown_default=str(DEFAULT_K))

    @property
    def resolved_k(self) -> int:
        return DEFAULT_K if self.k is None else self.k

    def check(self, width: int) -> None:
        refuse_unless(0 < self.resolved_k <= width, self, "k", f"must be in [1, width={width}], got {self.resolved_k}")


@dataclass
class TopKSettings(KSettings):
    aux_k: int | None = setting(None, "AuxK latents", shown_default="d_in / 2")
    aux_coef: float = setting(1 / 32, "AuxK loss coefficient (0 turns AuxK off)")

    def check(self, width: int) -> None:
        super().check(width)
        refuse_unless(
            self.aux_k is None or 1 <= self.aux_k <= width,
            self,
            "aux_k",
            f"must be in [1, width={width}], got {self.aux_k}",
        )
        refuse_unless(self.aux_coef >= 0, self, "aux_coef", f"must be >= 0 (0 turns AuxK off), got {self.aux_coef}")


class TopKSAE(SparseAutoencoder):
    arch = "topk"
    settings_class = TopKSettings

    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coef: float = 1 / 32):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.k = k
        self.aux_k = aux_k if aux_k is not None else d_in // 2  # the TopK paper's d/2
        self.aux_coef = aux_coef
        super().__init__(d_in, d_sae)

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: TopKSettings, **extra) -> TopKSAE:
        return cls(d_in, width, settings.resolved_k, settings.aux_k, settings.aux_coef, **extra)

    def encode(self, x: torch.Tensor) -> SparseCode:
        return self.encode_pre(self.pre_acts(x))

    def encode_pre(self, pre: torch.Tensor) -> SparseCode:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCode(values.relu(), indices)

    def training_loss(
        self, x: torch.Tensor, ctx: TrainContext, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss = ‖y − x̂‖² / mse_scale (fixed once at the start of training) + aux_coef · AuxK, where y is
        `target` (a transcoder's output rows), else x itself."""
        target = x if target is None else target
        n_aux = self.auxk_latents(ctx.dead)
        with torch.no_grad():
            bias = self.encoder_bias()
        # The selections, without autograd: gradients reach the encoder through the selected entries only.
        top = top_pre_acts(x, self.W_enc, bias, self.k, ctx.dead if n_aux else None, n_aux)
        code = SparseCode(self.selected_values(x, top.indices, top.values).relu(), top.indices)
        recon = self.decode(code)
        sq_err = (recon - target).pow(2).sum(dim=-1)
        aux = torch.zeros((), device=x.device)
        if n_aux:
            among = self.selected_values(x, top.among_indices, top.among_values)
            aux = self.auxk_of(SparseCode(among.relu(), top.among_indices), target - recon)
        loss = sq_err.mean() / ctx.mse_scale + self.aux_coef * aux
        return loss, reconstruction_metrics(target, sq_err, code, self.d_sae, loss, aux)

    def auxk_latents(self, dead: torch.Tensor | None) -> int:
        """How many latents AuxK reconstructs with this step: the top aux_k of the dead ones (0 when AuxK
        is off or nothing is dead)."""
        n_dead = 0 if dead is None else int(dead.sum())
        return 0 if self.aux_coef == 0 else min(self.aux_k, n_dead)

    def auxk_loss(
        self, x: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor | None
    ) -> torch.Tensor:
        """The top `aux_k` dead latents reconstruct the main reconstruction's (detached) residual; the
        error is normalized by the residual's own variance. Zero when nothing is dead. `pre`: the
        batch's pre-activations, computed without autograd."""
        n_aux = self.auxk_latents(dead)
        if n_aux == 0:
            return torch.zeros((), device=pre.device)
        with torch.no_grad():
            indices = pre.masked_fill(~dead, float("-inf")).topk(n_aux, dim=-1, sorted=False).indices
        return self.auxk_of(SparseCode(self.selected_pre_acts(x, pre, indices).relu(), indices), residual)

    def auxk_of(self, code: SparseCode, residual: torch.Tensor) -> torch.Tensor:
        """AuxK's loss for the dead latents' code: their reconstruction of the (detached) residual, its
        error normalized by the residual's own variance."""
        residual = residual.detach()
        aux_recon = self.decode_rows(code)
        # The residual's variance over the whole (global, under data parallelism) batch.
        mean = distributed.global_mean(residual.mean(dim=0))
        baseline = distributed.global_mean((residual - mean).pow(2).sum(dim=-1).mean()).clamp_min(1e-12)
        return (aux_recon - residual).pow(2).sum(dim=-1).mean() / baseline

    def saelens_export(self) -> ArchExport:
        # SAELens's TopK: top k pre-activations, ReLU, no decoder-norm rescaling (folded decoder rows are
        # no longer unit-norm, so rescaling must stay off): exactly ours.
        return ArchExport("topk", {"k": int(self.k), "rescale_acts_by_decoder_norm": False})

    def config(self) -> dict:
        return {**super().config(), "k": self.k, "aux_k": self.aux_k, "aux_coef": self.aux_coef}
