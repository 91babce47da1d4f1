"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

    f_i = pre_i · H(pre_i − θ_i),   θ = exp(log_threshold),   loss = ‖x − x̂‖² / mse_scale + λ · S
    S = L̄0 (the batch's mean L0), or (L̄0 / target_l0 − 1)² with a target

θ is trained by the paper's rectangle-kernel straight-through estimator, which reaches θ only.

Recipe, initialization, defaults in our units and λ: docs/architectures.md#jumprelu (measurements:
docs/history.md#architectures-how-the-recipes-were-arrived-at)
"""

from __future__ import annotations

import math
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

# λ per active latent per token, in units of the normalized MSE (‖x − x̂‖²/mse_scale ≈ the fraction of
# variance unexplained): a latent must explain ~0.1% of a token's variance to be worth firing.
DEFAULT_L0_COEF = 1e-3
# λ for the target_l0 penalty (L̄0/T − 1)², which is dimensionless and O(1) when L0 is off by 2x.
DEFAULT_TARGET_L0_COEF = 1.0


def default_bandwidth(d_in: int) -> float:
    """The paper's ε = 0.001 (inputs with E‖x‖² = 1) in our units (E‖x̂‖² ≈ d): 0.001·√d."""
    return 0.001 * math.sqrt(d_in)


def default_init_threshold(d_in: int, d_sae: int) -> float:
    """One standard deviation of the initial pre-activations under our normalization: with unit-norm
    decoder rows, W_enc = (d_in/d_sae)·W_decᵀ and E‖x̂‖² ≈ d, each pre-activation has std ≈ d_in/d_sae."""
    return d_in / d_sae


def _rectangle(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K((pre − θ)/ε) as float32: 1 where |pre − θ| < ε/2."""
    return ((pre.float() - threshold.float()).abs() < bandwidth / 2).float()


class JumpReLUFunction(torch.autograd.Function):
    """pre · H(pre − θ); gradient H(pre − θ) to pre and the rectangle-kernel STE to θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        grad_threshold = -(threshold.float() / ctx.bandwidth) * (grad.float() * kernel).sum(dim=0)
        return grad_pre, grad_threshold.to(threshold.dtype), None


class StepFunction(torch.autograd.Function):
    """H(pre − θ) as float32; no gradient to pre, the rectangle-kernel STE to θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        grad_threshold = -(grad.float() * kernel).sum(dim=0) / ctx.bandwidth
        return None, grad_threshold.to(threshold.dtype), None


def check_target_l0(target_l0, width: int) -> str | None:
    if target_l0 is not None and not 0 < target_l0 <= width:
        return f"must be in (0, width={width}], got {target_l0}"
    return None


@dataclass
class JumpReLUSettings(ArchSettings):
    bandwidth: float | None = setting(None, "straight-through estimator bandwidth", shown_default="0.001·√d_in")
    init_threshold: float | None = setting(None, "initial threshold", shown_default="d_in / width")
    l0_coef: float | None = setting(None, "L0 penalty coefficient", shown_default="1e-3, or 1 with --target-l0")
    target_l0: float | None = setting(None, "penalize the batch's mean L0 away from this target instead")

    def check(self, width: int) -> None:
        refuse_unless(
            self.bandwidth is None or (self.bandwidth > 0 and math.isfinite(self.bandwidth)),
            self,
            "bandwidth",
            f"must be > 0, got {self.bandwidth}",
        )
        refuse_unless(
            self.init_threshold is None or (self.init_threshold > 0 and math.isfinite(self.init_threshold)),
            self,
            "init_threshold",
            f"must be > 0, got {self.init_threshold}",
        )
        refuse_unless(self.l0_coef is None or self.l0_coef >= 0, self, "l0_coef", f"must be >= 0, got {self.l0_coef}")
        problem = check_target_l0(self.target_l0, width)
        refuse_unless(problem is None, self, "target_l0", problem or "")


class JumpReLUSAE(SparseAutoencoder):
    arch = "jumprelu"
    settings_class = JumpReLUSettings

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        bandwidth: float | None = 0.001,
        init_threshold: float | None = 0.001,
        l0_coef: float | None = None,
        target_l0: float | None = None,
    ):
        bandwidth = default_bandwidth(d_in) if bandwidth is None else float(bandwidth)
        init_threshold = default_init_threshold(d_in, d_sae) if init_threshold is None else float(init_threshold)
        if not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        if not (init_threshold > 0 and math.isfinite(init_threshold)):
            raise ValueError(f"init_threshold must be > 0, got {init_threshold}")
        if problem := check_target_l0(target_l0, d_sae):
            raise ValueError(f"target_l0 {problem}")
        if l0_coef is None:
            l0_coef = DEFAULT_L0_COEF if target_l0 is None else DEFAULT_TARGET_L0_COEF
        if not l0_coef >= 0:
            raise ValueError(f"l0_coef must be >= 0, got {l0_coef}")
        self.bandwidth, self.init_threshold = bandwidth, init_threshold
        self.l0_coef = float(l0_coef)
        self.target_l0 = None if target_l0 is None else float(target_l0)
        super().__init__(d_in, d_sae)
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), math.log(self.init_threshold)))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder = (d_in/d_sae) · decoderᵀ, thresholds at init_threshold."""
        super().reset_parameters(generator)
        self.W_enc.mul_(self.d_in / self.d_sae)
        if hasattr(self, "log_threshold"):  # not yet during __init__
            self.log_threshold.fill_(math.log(self.init_threshold))

    @classmethod
    def from_settings(cls, d_in: int, width: int, settings: JumpReLUSettings, **extra) -> JumpReLUSAE:
        s = settings
        return cls(d_in, width, s.bandwidth, s.init_threshold, s.l0_coef, s.target_l0, **extra)

    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> DenseCode:
        return self.encode_pre(self.pre_acts(x))

    def encode_pre(self, pre: torch.Tensor) -> DenseCode:
        return DenseCode(JumpReLUFunction.apply(pre, self.threshold(), self.bandwidth))

    def l0_penalty(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, L̄0): the sparsity term before λ and the batch's mean L0, both differentiable w.r.t. θ."""
        # The global batch's mean: the target penalty is not linear in it (see stages.basics.distributed).
        l0 = distributed.global_mean(StepFunction.apply(pre, self.threshold(), self.bandwidth).sum(dim=-1).mean())
        if self.target_l0 is None:
            return l0, l0
        return (l0 / self.target_l0 - 1).pow(2), l0

    def training_loss(
        self, x: torch.Tensor, ctx: TrainContext, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`target`: what the decoder reconstructs (a transcoder's output rows); x itself by default."""
        target = x if target is None else target
        pre = self.pre_acts(x)
        code = self.encode_pre(pre)
        recon = self.decode(code)
        sq_err = (recon - target).pow(2).sum(dim=-1)
        sparsity, _ = self.l0_penalty(pre)
        loss = sq_err.mean() / ctx.mse_scale + self.l0_coef * sparsity
        metrics = reconstruction_metrics(target, sq_err, code, self.d_sae, loss, torch.zeros((), device=x.device))
        metrics["sparsity_loss"] = sparsity.detach()
        return loss, metrics

    def saelens_export(self) -> ArchExport:
        # SAELens's "jumprelu": ReLU(pre) · 1[pre > threshold]; with θ > 0 that is exactly pre · H(pre − θ).
        # The threshold lives in pre-activation space, which the normalization fold leaves unchanged.
        return ArchExport("jumprelu", {}, {"threshold": self.threshold().detach()})

    def config(self) -> dict:
        return {
            **super().config(),
            "bandwidth": self.bandwidth,
            "init_threshold": self.init_threshold,
            "l0_coef": self.l0_coef,
            "target_l0": self.target_l0,
        }
