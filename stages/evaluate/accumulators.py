"""Streaming accumulators for eval's store-only metrics; exact definitions in docs/metrics.md.

Sums are kept in float64 so that variance (a difference of two large sums) survives millions of rows.
"""

from __future__ import annotations

import numpy as np
import torch

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens counts as dense
DENSITY_BINS = np.linspace(-8.0, 0.0, 41)  # log10 firing fraction, 0.2 decades per bin
_TINY_NORM = 1e-4  # an input norm below this counts as 1 in the l2 ratio, as SAELens does


class ReconstructionStats:
    """mse, nmse/fve (three conventions), cosine, l2 ratio and relative reconstruction bias of x_hat
    against x, accumulated over batches of rows."""

    def __init__(self, d: int, device: torch.device):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.d, self.n = d, 0
        self.sum_x, self.sum_sq, self.sq_err = z(d), z(()), z(())
        self.fve_per_token_sum, self.cosine_sum, self.l2_ratio_sum = z(()), z(()), z(())
        self.rec_sq, self.dot = z(()), z(())

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        err = (x_hat - x).pow(2).sum(dim=-1)
        self.n += x.shape[0]
        self.sum_x += x.sum(dim=0)
        self.sum_sq += x.pow(2).sum()
        self.sq_err += err.sum()
        # SAELens's earlier ("legacy") explained variance: per token, against the batch's own mean
        self.fve_per_token_sum += (1 - err / (x - x.mean(dim=0)).pow(2).sum(dim=-1)).sum()
        self.cosine_sum += torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).sum()
        norm_in = x.norm(dim=-1)
        self.l2_ratio_sum += (x_hat.norm(dim=-1) / torch.where(norm_in < _TINY_NORM, 1.0, norm_in)).sum()
        self.rec_sq += x_hat.pow(2).sum()
        self.dot += (x * x_hat).sum()

    def result(self, prefix: str = "") -> dict[str, float]:
        n = max(self.n, 1)
        total_var = float(self.sum_sq - self.sum_x.pow(2).sum() / n)  # Σ‖x − mean‖²
        sq_err, sum_sq = float(self.sq_err), float(self.sum_sq)
        m = {
            "mse": sq_err / (n * self.d),
            "mse_per_token": sq_err / n,
            "nmse": sq_err / total_var,
            "fve": 1 - sq_err / total_var,
            "nmse_vs_zero": sq_err / sum_sq,
            "fve_vs_zero": 1 - sq_err / sum_sq,
            "fve_per_token": float(self.fve_per_token_sum) / n,
            "cosine": float(self.cosine_sum) / n,
            "l2_ratio": float(self.l2_ratio_sum) / n,
            "relative_reconstruction_bias": float(self.rec_sq) / float(self.dot),
        }
        return {prefix + k: v for k, v in m.items()}


class SparsityStats:
    """L0 (mean and distribution) and per-latent firing counts, accumulated over codes."""

    def __init__(self, d_sae: int, device: torch.device):
        self.d_sae, self.n = d_sae, 0
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.long, device=device)
        self.fires = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.l1_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, code) -> None:
        l0 = code.l0()
        self.n += int(l0.numel())
        self.l1_sum += code.values.double().clamp_min(0).sum()
        self.l0_counts += torch.bincount(l0, minlength=self.d_sae + 1)
        self.fires += code.fire_counts(self.d_sae)

    def density(self) -> np.ndarray:
        """Fraction of the tokens on which each latent fired."""
        return self.fires.double().cpu().numpy() / max(self.n, 1)

    def result(self) -> dict:
        counts = self.l0_counts.cpu().numpy()
        values = np.arange(len(counts))
        cumulative = np.cumsum(counts) / max(self.n, 1)
        quantile = lambda q: int(np.searchsorted(cumulative, q))  # noqa: E731 - smallest l0 with CDF >= q
        used = np.flatnonzero(counts)
        last = int(used[-1]) if len(used) else 0
        density = self.density()
        alive = density[density > 0]
        hist, _ = np.histogram(np.clip(np.log10(alive), DENSITY_BINS[0], DENSITY_BINS[-1]), bins=DENSITY_BINS)
        return {
            "l0": float((counts * values).sum()) / max(self.n, 1),
            "l1": float(self.l1_sum) / max(self.n, 1),  # the latents' summed activation per token (SAEBench's l1)
            "l0_quantiles": {"p10": quantile(0.1), "p50": quantile(0.5), "p90": quantile(0.9), "max": last},
            "l0_histogram": {"edges": list(range(last + 2)), "counts": counts[: last + 1].tolist()},
            "dead_fraction": float((density == 0).mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).mean()),
            "log10_density_histogram": {
                "edges": DENSITY_BINS.tolist(),
                "counts": hist.tolist(),
                "dead": int((density == 0).sum()),
            },
        }
