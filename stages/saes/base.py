"""What every SAE shares: the affine encoder/decoder, unit-norm decoder rows, the TopK-paper init.

Shapes follow SAELens: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and
    pre = (x − b_dec) W_enc + b_enc,   x̂ = f(pre) W_dec + b_dec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SparseCode:
    """A batch of latent codes kept sparse: the top values and their latent indices per row."""

    values: torch.Tensor  # [n, k], >= 0
    indices: torch.Tensor  # [n, k] int64

    def dense(self, d_sae: int) -> torch.Tensor:
        out = torch.zeros(self.values.shape[0], d_sae, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        """Active latents per row."""
        return (self.values > 0).sum(dim=-1)

    def fire_counts(self, d_sae: int) -> torch.Tensor:
        """How many rows of the batch each latent fired on [d_sae]."""
        active = self.indices[self.values > 0]
        return torch.bincount(active, minlength=d_sae)


class SparseAutoencoder(nn.Module):
    arch = "base"

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows and the encoder as their transpose (TopK paper, section 2.3)."""
        self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator))
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> SparseCode:
        raise NotImplementedError

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Sparse decode: a weighted sum of k decoder rows per input row, never the dense d_sae matmul."""
        return self.decode_rows(code) + self.b_dec

    def decode_rows(self, code: SparseCode) -> torch.Tensor:
        """The decoder rows' weighted sum without b_dec (also what AuxK reconstructs the residual with)."""
        return nn.functional.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values.to(self.W_dec.dtype),
                                           mode="sum")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- the decoder-norm constraint ----------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient that would only change the row's norm."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(dim=1, keepdim=True) * w)

    def config(self) -> dict:
        """Architecture hyper-parameters, enough to rebuild the module (see stages.saes.build_sae)."""
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae}


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimizing the sum of distances to `points` [n, d]."""
    x = points.detach().double()
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = (new - median).norm() / median.norm().clamp_min(1e-12)
        median = new
        if moved < tol:
            break
    return median.to(points.dtype)
