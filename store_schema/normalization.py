"""Activation normalization: estimated once from a warm-up sample, recorded in the store, inverted exactly.

Modes (``x`` is one raw activation row of width ``d``):

- ``center-scale``: ``x̂ = (x − μ) · c`` with ``μ`` the dataset mean and ``c = √d / E‖x − μ‖``,
  both float32, estimated (in float64) from the warm-up sample and recorded. Inverse ``x = x̂ / c + μ``.
- ``token``: per row, ``x̂ = (x − m) / s`` with ``m`` the row's own mean over ``d`` and
  ``s = ‖x − m‖ / √d`` (so ``‖x̂‖ = √d``, the same scale as ``center-scale``). ``m`` and ``s`` are kept
  per row (float32) so the map stays invertible: ``x = x̂ · s + m``.
- ``none``: ``x̂ = x``.

Massive activations. A few tokens (attention sinks: document separators, some first newlines) have
residual norms ~100x the rest; left in, they hold almost all of the variance and an SAE spends itself on
them. `max_norm` (raw ‖x‖ above `outlier_factor` x the warm-up median) marks such rows: collect does not
store them, the statistics above are estimated without them, and eval leaves them unspliced.

All arithmetic is float32 on the tensor's device, so a resumed collect normalizes bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("center-scale", "token", "none")

# Guard against a zero-norm row (e.g. an all-constant activation) in `token` mode.
_TOKEN_EPS = 1e-6


@dataclass(frozen=True)
class Normalization:
    mode: str
    mean: np.ndarray | None = None  # float32 [d], center-scale only
    scale: float = 1.0  # the float32 value of c, center-scale only
    max_norm: float | None = None  # raw rows with a larger L2 norm are outliers (never stored)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown normalization mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.mode == "center-scale" and self.mean is None:
            raise ValueError("center-scale normalization needs a mean")

    def problem(self) -> str | None:
        """Why rows normalized (or inverted) with this would be wrong, or None when it is usable: a scale
        that is not a positive finite number, a mean or outlier bound that is not finite."""
        if self.mode == "center-scale":
            if not (math.isfinite(self.scale) and self.scale > 0):
                return f"scale {self.scale} (it must be a positive finite number)"
            if not np.isfinite(self.mean).all():
                return f"{int((~np.isfinite(self.mean)).sum())} non-finite values in its mean"
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            return f"outlier bound {self.max_norm} (it must be a positive finite number)"
        return None

    @property
    def has_row_stats(self) -> bool:
        """True when each stored row carries its own (mean, scale) pair needed to invert it."""
        return self.mode == "token"

    @classmethod
    def estimate(cls, mode: str, sample: torch.Tensor, outlier_factor: float | None = None) -> Normalization:
        """Fix the normalization from a warm-up sample of raw rows [n, d] (float64 accumulation)."""
        x = sample.detach().to("cpu", torch.float64)
        max_norm = None
        if outlier_factor is not None:
            max_norm = float(np.float32(outlier_factor * x.norm(dim=1).median().item()))
            x = x[x.norm(dim=1) <= max_norm]
        if mode != "center-scale":
            return cls(mode, max_norm=max_norm)
        mean = x.mean(dim=0)
        mean_norm = (x - mean).norm(dim=1).mean().item()
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise ValueError("cannot estimate center-scale normalization: warm-up rows have no spread")
        scale = float(np.float32(math.sqrt(x.shape[1]) / mean_norm))
        estimated = cls(mode, mean.numpy().astype(np.float32), scale, max_norm)
        if estimated.problem() is not None:  # e.g. a spread so small that its inverse overflows float32
            raise ValueError(f"cannot estimate center-scale normalization from the warm-up rows: {estimated.problem()}")
        return estimated

    def same_transform(self, other: Normalization) -> bool:
        """Whether both map raw rows to the same normalized rows (max_norm only marks outliers)."""
        same_mean = (self.mean is None) == (other.mean is None) and (
            self.mean is None or np.array_equal(self.mean, other.mean)
        )
        return self.mode == other.mode and self.scale == other.scale and same_mean

    def inliers(self, x: torch.Tensor) -> torch.Tensor:
        """Bool mask over raw rows [..., d]: True where the row is not a massive-activation outlier."""
        if self.max_norm is None:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return x.float().norm(dim=-1) <= self.max_norm

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw float32 rows [n, d] -> (normalized rows, per-row stats [n, 2] or None)."""
        if self.mode == "none":
            return x, None
        if self.mode == "center-scale":
            mean = torch.as_tensor(self.mean, device=x.device, dtype=torch.float32)
            return (x - mean) * torch.tensor(self.scale, dtype=torch.float32, device=x.device), None
        row_mean = x.mean(dim=1, keepdim=True)
        centered = x - row_mean
        row_scale = centered.norm(dim=1, keepdim=True) / math.sqrt(x.shape[1]) + _TOKEN_EPS
        return centered / row_scale, torch.cat([row_mean, row_scale], dim=1)

    def apply_(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`apply` on float32 rows, written into them: the same operations in the same order, so the very
        same values, without a second block-sized buffer (collect's rows)."""
        if x.dtype != torch.float32:
            raise ValueError(f"apply_ normalizes float32 rows in place, got {x.dtype}")
        if self.mode == "none":
            return x, None
        if self.mode == "center-scale":
            mean = torch.as_tensor(self.mean, device=x.device, dtype=torch.float32)
            return x.sub_(mean).mul_(torch.tensor(self.scale, dtype=torch.float32, device=x.device)), None
        row_mean = x.mean(dim=1, keepdim=True)
        centered = x.sub_(row_mean)
        row_scale = centered.norm(dim=1, keepdim=True) / math.sqrt(x.shape[1]) + _TOKEN_EPS
        return centered.div_(row_scale), torch.cat([row_mean, row_scale], dim=1)

    def invert(self, x_hat: torch.Tensor, row_stats: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized rows [..., d] -> raw rows (float32)."""
        x_hat = x_hat.float()
        if self.mode == "none":
            return x_hat
        if self.mode == "center-scale":
            mean = torch.as_tensor(self.mean, device=x_hat.device, dtype=torch.float32)
            return x_hat / torch.tensor(self.scale, dtype=torch.float32, device=x_hat.device) + mean
        if row_stats is None:
            raise ValueError("token normalization needs the per-row (mean, scale) stats to invert")
        row_stats = row_stats.to(x_hat.device, torch.float32)
        return x_hat * row_stats[..., 1:2] + row_stats[..., 0:1]

    def to_attrs(self) -> dict:
        """The JSON part; the mean vector is stored as an array beside it."""
        return {"mode": self.mode, "scale": self.scale, "max_norm": self.max_norm}

    @classmethod
    def from_attrs(cls, attrs: dict, mean: np.ndarray | None) -> Normalization:
        return cls(
            attrs["mode"],
            None if mean is None else np.asarray(mean, dtype=np.float32),
            float(attrs["scale"]),
            attrs.get("max_norm"),
        )
