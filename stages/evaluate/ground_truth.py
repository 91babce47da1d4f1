"""Ground truth (`--suite ground-truth`): an SAE trained on a store whose rows were built from known
features (a synthetic store) is compared with them: the mean correlation coefficient (MCC, as SAELens's
synthetic benchmark, SynthSAEBench, reports it) and the share of features recovered.

Definitions: docs/metrics.md#ground-truth
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment

from stages.basics.errors import SaepipeError, first_line

RECOVERED_COSINE = 0.9  # a planted feature counts as recovered when some decoder row is this close
TRUTH_KEY = "features"  # the tensor a --truth file holds: the planted directions [n_features, d]


def _unit(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.detach().double()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mean_correlation_coefficient(learned: torch.Tensor, planted: torch.Tensor) -> float:
    """The mean |cosine| over a one-to-one matching of learned to planted directions that maximizes it
    (the Hungarian algorithm): 1 when every planted direction has its own learned copy."""
    cosine = (_unit(learned) @ _unit(planted).T).abs().cpu().numpy()
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    return float(cosine[rows, cols].mean())


def recovered_fraction(learned: torch.Tensor, planted: torch.Tensor, threshold: float = RECOVERED_COSINE) -> float:
    """Share of planted directions with some learned direction at cosine >= threshold."""
    best = (_unit(planted) @ _unit(learned).T).max(dim=1).values
    return float((best >= threshold).double().mean())


def load_truth(path: str | Path, width: int) -> torch.Tensor:
    """The planted directions of a --truth file (safetensors, key "features", [n_features, width])."""
    try:
        features = load_file(str(path))[TRUTH_KEY]
    except FileNotFoundError:
        raise SaepipeError(f"--truth {path}: no such file") from None
    except KeyError:
        raise SaepipeError(
            f"--truth {path} holds no tensor '{TRUTH_KEY}': save the planted directions under it"
        ) from None
    except Exception as e:  # noqa: BLE001 - safetensors' own errors
        raise SaepipeError(f"--truth {path} is not a safetensors file ({first_line(e)})") from None
    if features.ndim != 2 or features.shape[1] != width:
        raise SaepipeError(
            f"--truth {path} holds features of shape {tuple(features.shape)}; the SAE writes rows of width {width}"
        )
    return features


def decoder_rows(sae) -> torch.Tensor:
    """The SAE's decoder rows [d_sae, d_out]: what is compared with the planted directions."""
    if not isinstance(getattr(sae, "W_dec", None), torch.Tensor):
        raise SaepipeError(f"--suite ground-truth compares decoder rows; a {sae.arch} has no single decoder matrix")
    return sae.W_dec


def ground_truth_metrics(sae, truth: torch.Tensor) -> dict:
    rows = decoder_rows(sae)
    return {
        "features": int(truth.shape[0]),
        "mcc": mean_correlation_coefficient(rows, truth),
        "recovered_fraction": recovered_fraction(rows, truth),
    }
