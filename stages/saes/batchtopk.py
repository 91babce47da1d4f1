"""BatchTopK SAE (Bussmann, Leask & Nanda, "BatchTopK Sparse Autoencoders", 2024).

Training keeps the k·B largest ReLU'd pre-activations of the whole batch of B rows instead of k per
row, so a row's L0 varies (hard rows take more latents, easy ones fewer) while the batch mean stays k.
Dead latents are revived by the TopK paper's AuxK loss, inherited from TopKSAE.

That selection depends on the other rows of the batch, so it is a training-time device only. What a
row gets at inference is a JumpReLU with one global threshold θ learned during training:

    encode(x) = pre · [pre > θ],   pre = (x − b_dec) W_enc + b_enc     (θ >= 0, so this is ReLU'd)

θ estimates the batch selection's cut-off: each training step's smallest kept positive activation
(the k·B-th largest, i.e. exactly the batch's own threshold) is folded into an exponential moving
average (rate THRESHOLD_RATE = 0.05, a horizon of about 20 steps; the first step sets it outright,
so there is no bias towards the initial 0). An EMA and not a running mean over all of training: the
cut-off moves a lot while the encoder learns, and a mean over every step would be dominated by
those early, stale values; the EMA tracks the current encoder, and by the end of training (the
learning rate decays to zero) it averages the last ~20 steps of a nearly frozen model, which is the
paper's "average of the minimum positive activations over a number of batches" taken where it
matters. Why 0.05 and not SAELens's 0.01: each batch's cut-off is a quantile of k·B values, steady
from batch to batch, so a short horizon costs little noise, while a long one lags. Measured on the
default store (width 2048, k 32, 200 steps of 2,048): inference L0 25.3 and FVE 0.744 at 0.01, L0
31.3 and FVE 0.765 at 0.05. It is updated only in training mode (like batch-norm statistics), so a loss computed on
held-out data after `sae.eval()` does not move it.

`encode` is the JumpReLU in both training and eval mode (no `self.training` switch): a row's code
never depends on which rows share its batch, evaluation code that forgets `.eval()` still measures
the SAE that is deployed, and it is exactly what the SAELens export computes. The batch selection
is `batch_topk`, used by `training_loss` only.

θ is a persistent 0-dim buffer `threshold`, saved with the weights; the SAELens export is the
architecture "jumprelu" with a per-latent `threshold` tensor (θ repeated d_sae times), in
pre-activation space, which the normalization fold leaves unchanged.
"""

from __future__ import annotations

import torch

from stages.basics import distributed
from stages.saes.base import ArchExport, DenseCode, SparseCode, TrainContext, reconstruction_metrics
from stages.saes.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    THRESHOLD_RATE = 0.05  # EMA rate of the inference threshold (see the module docstring)

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
        """Norm of each latent's initial encoder column. At init the batch selection hands the k·B slots
        to the rows with the largest norms (measured on the planted-feature test data, k = 8: up to 61
        latents on one row, a quarter of the rows none), and with a unit-norm encoder those rows'
        reconstructions overshoot badly (step-0 FVE −0.37, where TopK starts at +0.25). Training
        recovers, but many latents come out of it idle: firing too rarely to win the batch cut-off, yet
        too often to count as dead for AuxK (80% of the planted features recovered, against 99.6% in
        the same run with the scaled encoder). A smaller encoder keeps the first reconstructions short
        of the data instead (step-0 FVE +0.39 at 0.5). √(2·d_in/d_sae) is the column norm of the
        kaiming-uniform encoder Bussmann et al.'s reference implementation starts from (0.25–0.35 at
        usual LM widths); anything in 0.1–0.5 recovered ≥ 97% in that test."""
        return min(1.0, (2 * d_in / d_sae) ** 0.5)

    # -- inference: JumpReLU with the learned threshold -----------------------------------------------
    def encode_pre(self, pre: torch.Tensor) -> DenseCode:
        return DenseCode(torch.where(pre > self.threshold, pre, torch.zeros((), dtype=pre.dtype, device=pre.device)))

    # -- training: the batch's top k·B ---------------------------------------------------------------
    def batch_topk(self, pre: torch.Tensor) -> SparseCode:
        """The k·B largest ReLU'd pre-activations of the batch [B, d_sae], as a sparse code decoded like
        TopK's (never densely). Each row holds its top w latents, w the busiest row's count, with the
        ones below the batch's cut-off set to 0 (which counts neither in L0 nor in fire counts, and
        decodes to nothing); a row's latents are distinct, so `dense()` is exact. Exact ties at the
        cut-off are all kept."""
        # Selecting on `pre` itself (no ReLU'd copy of the whole batch): entries <= 0 among the k·B are
        # ReLU'd to 0 below, which is what selecting among ReLU'd values would give. Under data
        # parallelism B is the global batch and the cut-off is taken over every rank's rows.
        cutoff = distributed.kth_largest(pre, self.k * pre.shape[0] * distributed.world_size())
        per_row = (pre >= cutoff).sum(dim=-1)
        values, indices = pre.topk(max(int(per_row.max()), 1), dim=-1, sorted=False)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        values = torch.where(values >= cutoff, values.relu(), zero)
        return SparseCode(values, indices)

    @property
    def prefixes(self) -> tuple[int, ...]:
        """Prefix widths whose reconstructions the loss sums: the whole SAE only (see MatryoshkaSAE)."""
        return (self.d_sae,)

    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss = Σ over prefixes m of ‖x − x̂_m‖² / mse_scale + aux_coef · AuxK, where x̂_m decodes the
        batch-top-k code with latents < m only (BatchTopK: the single prefix d_sae). Also moves the
        inference threshold (in training mode)."""
        with torch.no_grad():  # the selection; gradients reach the encoder through the selected entries only
            pre = self.pre_acts(x)
            selected = self.batch_topk(pre)
        values = self.selected_pre_acts(x, pre, selected.indices).masked_fill(selected.values <= 0, 0.0)
        code = SparseCode(values, selected.indices)
        if self.training:
            self.update_threshold(code.values)
        recon = self.b_dec.expand_as(x)
        mse_sum = torch.zeros((), device=x.device)
        start = 0
        for end in self.prefixes:  # each prefix's reconstruction adds the latents [start, end)
            band = (
                code
                if (start, end) == (0, self.d_sae)
                else SparseCode(code.values * ((code.indices >= start) & (code.indices < end)), code.indices)
            )
            recon = recon + self.decode_rows(band)
            sq_err = (recon - x).pow(2).sum(dim=-1)
            mse_sum = mse_sum + sq_err.mean()
            start = end
        aux = self.auxk_loss(x, pre, x - recon, ctx.dead)  # the full reconstruction's residual
        loss = mse_sum / ctx.mse_scale + self.aux_coef * aux
        return loss, reconstruction_metrics(x, sq_err, code, self.d_sae, loss, aux)

    @torch.no_grad()
    def update_threshold(self, kept: torch.Tensor) -> None:
        """EMA of the smallest positive kept activation (no host sync; a batch with none is skipped)."""
        kept = kept.detach().float()
        smallest = distributed.min_(kept.masked_fill(kept <= 0, float("inf")).min())
        r = self.THRESHOLD_RATE
        new = torch.where(self.threshold > 0, (1 - r) * self.threshold + r * smallest, smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), new, self.threshold))

    def saelens_export(self) -> ArchExport:
        # SAELens's JumpReLU: ReLU(pre) · [pre > threshold] with a per-latent threshold in pre-activation
        # space; with θ >= 0 that is exactly our encode.
        return ArchExport("jumprelu", {}, {"threshold": self.threshold.detach().float().expand(self.d_sae).clone()})
