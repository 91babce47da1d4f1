"""SAE architectures, one module each, all trained by stages.train."""

from __future__ import annotations

from stages.saes.base import SparseAutoencoder, SparseCode
from stages.saes.batchtopk import BatchTopKSAE
from stages.saes.jumprelu import JumpReLUSAE
from stages.saes.matching_pursuit import MatchingPursuitSAE
from stages.saes.matryoshka import MatryoshkaSAE
from stages.saes.relu import ReLUSAE
from stages.saes.topk import TopKSAE

ARCHITECTURES = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
    "relu": ReLUSAE,
    "jumprelu": JumpReLUSAE,
    "mp": MatchingPursuitSAE,
}


def build_sae(config: dict) -> SparseAutoencoder:
    """Rebuild an SAE module (uninitialized weights) from `SparseAutoencoder.config()`."""
    params = {k: v for k, v in config.items() if k != "arch"}
    return ARCHITECTURES[config["arch"]](**params)


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "MatryoshkaSAE",
    "JumpReLUSAE",
    "MatchingPursuitSAE",
    "ReLUSAE",
    "SparseAutoencoder",
    "SparseCode",
    "TopKSAE",
    "build_sae",
]
