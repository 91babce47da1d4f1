"""BatchTopK SAE (Bussmann, Leask & Nanda, "BatchTopK Sparse Autoencoders", 2024).

Training keeps the k·B largest ReLU'd pre-activations of the whole batch of B rows instead of k per row, so
a row's L0 varies while the batch mean stays k; AuxK is inherited from TopKSAE. That selection depends on
the other rows, so `encode` (in training and eval mode alike) is a JumpReLU with one threshold θ, an EMA
of the training batches' cut-offs, saved as the buffer `threshold` and exported to SAELens as "jumprelu".

Recipe and derivation: docs/architectures.md#batchtopk (the measurements behind it: docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

import torch

from stages.basics import distributed
from stages.saes.base import ArchExport, DenseCode, SparseCode, TrainContext, reconstruction_metrics
from stages.saes.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    extra_log_keys = ("inference_l0",)
    THRESHOLD_RATE = 0.05  # EMA rate of the inference threshold (why 0.05: docs/architectures.md#batchtopk)

    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coef: float = 1 / 32):
        super().__init__(d_in, d_sae, k, aux_k, aux_coef)
        self.register_buffer("threshold", torch.zeros(()))  # persistent: needed at inference

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The TopK paper's init (unit-norm random decoder rows, encoder their transpose), but with the
        encoder scaled down to √(2·d_in/d_sae) (at most 1): see `encoder_init_scale`."""
        super().reset_parameters(generator)
        self.W_enc.mul_(self.encoder_init_scale(self.d_in, self.d_sae))
        if hasattr(self, "threshold"):  # not yet registered when the base constructor calls this
            self.threshold.zero_()

    @staticmethod
    def encoder_init_scale(d_in: int, d_sae: int) -> float:
        """Norm of each latent's initial encoder column: that of the kaiming-uniform encoder Bussmann et
        al.'s reference implementation starts from. With a unit-norm encoder the first batch selections
        overshoot and many latents end up idle (docs/architectures.md#batchtopk)."""
        return min(1.0, (2 * d_in / d_sae) ** 0.5)

    # -- inference: JumpReLU with the learned threshold -----------------------------------------------
    def encode_pre(self, pre: torch.Tensor) -> DenseCode:
        return DenseCode(above_threshold(pre, self.threshold))

    # -- training: the batch's top k·B ---------------------------------------------------------------
    def batch_topk(self, pre: torch.Tensor) -> SparseCode:
        return batch_top_k(pre, self.k)

    @property
    def prefixes(self) -> tuple[int, ...]:
        """Prefix widths whose reconstructions the loss sums: the whole SAE only (see MatryoshkaSAE)."""
        return (self.d_sae,)

    def training_loss(
        self, x: torch.Tensor, ctx: TrainContext, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss = Σ over prefixes m of ‖y − x̂_m‖² / mse_scale + aux_coef · AuxK, where x̂_m decodes the
        batch-top-k code with latents < m only (BatchTopK: the single prefix d_sae) and y is `target` (a
        transcoder's output rows), else x. Also moves the inference threshold (in training mode)."""
        target = x if target is None else target
        with torch.no_grad():  # the selection; gradients reach the encoder through the selected entries only
            pre = self.pre_acts(x)
            selected = self.batch_topk(pre)
        values = self.selected_pre_acts(x, pre, selected.indices).masked_fill(selected.values <= 0, 0.0)
        code = SparseCode(values, selected.indices)
        # What inference would fire on this batch, with the threshold as it stands before this step's move:
        # the log shows whether the threshold has settled near k (it starts at zero: every latent passes).
        # (count_nonzero: summing the [B, d_sae] bool mask took 10x as long, 40 ms a step at 4,096 x 4,096)
        inference_l0 = torch.count_nonzero(pre > self.threshold) / pre.shape[0]
        if self.training:
            self.update_threshold(code.values)
        recon = self.b_dec.expand_as(target)
        mse_sum = torch.zeros((), device=x.device)
        start = 0
        for end in self.prefixes:  # each prefix's reconstruction adds the latents [start, end)
            band = (
                code
                if (start, end) == (0, self.d_sae)
                else SparseCode(code.values * ((code.indices >= start) & (code.indices < end)), code.indices)
            )
            recon = recon + self.decode_rows(band)
            sq_err = (recon - target).pow(2).sum(dim=-1)
            mse_sum = mse_sum + sq_err.mean()
            start = end
        aux = self.auxk_loss(x, pre, target - recon, ctx.dead)  # the full reconstruction's residual
        loss = mse_sum / ctx.mse_scale + self.aux_coef * aux
        return loss, reconstruction_metrics(target, sq_err, code, self.d_sae, loss, aux) | {
            "inference_l0": inference_l0
        }

    @torch.no_grad()
    def update_threshold(self, kept: torch.Tensor) -> None:
        self.threshold.copy_(moved_threshold(self.threshold, kept, self.THRESHOLD_RATE))

    def saelens_export(self) -> ArchExport:
        # SAELens's JumpReLU: ReLU(pre) · [pre > threshold] with a per-latent threshold in pre-activation
        # space; with θ >= 0 that is exactly our encode.
        return ArchExport("jumprelu", {}, {"threshold": self.threshold.detach().float().expand(self.d_sae).clone()})


def batch_top_k(pre: torch.Tensor, k: int) -> SparseCode:
    """The k·B largest ReLU'd pre-activations of a batch [B, d_sae], as a sparse code decoded like TopK's
    (never densely). Each row holds its top w latents, w the busiest row's count, with the ones below the
    batch's cut-off set to 0 (which counts neither in L0 nor in fire counts, and decodes to nothing); a
    row's latents are distinct, so `dense()` is exact. Exact ties at the cut-off are all kept."""
    # Selecting on `pre` itself (no ReLU'd copy of the whole batch): entries <= 0 among the k·B are
    # ReLU'd to 0 below, which is what selecting among ReLU'd values would give. Under data
    # parallelism B is the global batch and the cut-off is taken over every rank's rows.
    cutoff = distributed.kth_largest(pre, k * pre.shape[0] * distributed.world_size())
    per_row = (pre >= cutoff).sum(dim=-1)
    values, indices = pre.topk(max(int(per_row.max()), 1), dim=-1, sorted=False)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(values >= cutoff, values.relu(), zero)
    return SparseCode(values, indices)


@torch.no_grad()
def moved_threshold(threshold: torch.Tensor, kept: torch.Tensor, rate: float) -> torch.Tensor:
    """The inference threshold moved towards the smallest positive kept activation, an EMA of `rate` (no host
    sync; a batch with none leaves it)."""
    kept = kept.detach().float()
    smallest = distributed.min_(kept.masked_fill(kept <= 0, float("inf")).min())
    new = torch.where(threshold > 0, (1 - rate) * threshold + rate * smallest, smallest)
    return torch.where(torch.isfinite(smallest), new, threshold)


def above_threshold(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The inference code of a BatchTopK layer: a JumpReLU, pre-activations above the learned threshold."""
    return torch.where(pre > threshold, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
