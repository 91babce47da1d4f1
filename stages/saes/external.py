"""An SAE trained elsewhere (a SAELens SAE object) behind our interface, so eval can measure it on
the same yardstick as ours.

What it wraps and what it cannot do: docs/architectures.md#external-saes-trained-elsewhere
"""

from __future__ import annotations

import torch
from torch import nn

from stages.saes.base import DenseCode, SparseAutoencoder


class ExternalSAE(SparseAutoencoder):
    arch = "external"

    def __init__(self, inner: nn.Module):
        nn.Module.__init__(self)  # no weights of our own: the wrapped SAE holds them
        self.inner = inner
        self.d_in, self.d_sae = int(inner.cfg.d_in), int(inner.cfg.d_sae)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 - the name every SAE library uses
        return self.inner.W_dec

    def encode(self, x: torch.Tensor) -> DenseCode:
        acts = self.inner.encode(x)
        return DenseCode(acts.to_dense() if acts.is_sparse else acts)

    def decode(self, code) -> torch.Tensor:
        return self.inner.decode(code.dense(self.d_sae))

    def output(self, x: torch.Tensor, code) -> torch.Tensor:
        out = self.decode(code)
        skip = getattr(self.inner, "W_skip", None)  # a SAELens skip transcoder: W_skip is [d_out, d_in]
        return out if skip is None else out + x @ skip.T

    @property
    def display_arch(self) -> str:
        return f"saelens {self.inner.cfg.architecture()}"

    def config(self) -> dict:
        return {
            "arch": self.arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": self.inner.cfg.architecture(),
        }
