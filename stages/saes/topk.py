"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders"): keep the k largest
pre-activations per row, ReLU them, decode sparsely. Dead latents are revived by the AuxK loss: the
top `aux_k` dead latents reconstruct the main reconstruction's residual.
"""

from __future__ import annotations

import torch

from stages.saes.base import SparseAutoencoder, SparseCode


class TopKSAE(SparseAutoencoder):
    arch = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.k = k
        super().__init__(d_in, d_sae)

    def encode(self, x: torch.Tensor) -> SparseCode:
        return self.encode_pre(self.pre_acts(x))

    def encode_pre(self, pre: torch.Tensor) -> SparseCode:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCode(values.relu(), indices)

    def training_loss(self, x: torch.Tensor, *, mse_scale: float, dead: torch.Tensor | None,
                      aux_k: int, aux_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss = ‖x − x̂‖² / mse_scale (mse_scale fixed once at the start of training) + aux_coef · AuxK.

        `dead` is a bool mask [d_sae] of latents that have not fired for the dead-latent window.
        Returns the loss and detached per-batch metrics.
        """
        pre = self.pre_acts(x)
        code = self.encode_pre(pre)
        recon = self.decode(code)
        sq_err = (recon - x).pow(2).sum(dim=-1)
        loss = sq_err.mean() / mse_scale
        aux = torch.zeros((), device=x.device)
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead > 0 and aux_coef > 0:
            residual = (x - recon).detach()
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            aux_code = self.encode_dead(dead_pre, min(aux_k, n_dead))
            aux_recon = self.decode_rows(aux_code)
            baseline = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
            aux = (aux_recon - residual).pow(2).sum(dim=-1).mean() / baseline
            loss = loss + aux_coef * aux
        with torch.no_grad():
            variance = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
            metrics = {"loss": loss.detach(), "mse": sq_err.mean() / x.shape[-1], "aux_loss": aux.detach(),
                       "fve": 1 - sq_err.mean() / variance, "l0": code.l0().float().mean(),
                       "fire_counts": code.fire_counts(self.d_sae)}
        return loss, metrics

    @staticmethod
    def encode_dead(masked_pre: torch.Tensor, k: int) -> SparseCode:
        values, indices = masked_pre.topk(k, dim=-1, sorted=False)
        return SparseCode(values.relu(), indices)

    def config(self) -> dict:
        return {**super().config(), "k": self.k}
