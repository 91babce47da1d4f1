"""What eval's `--suite core` adds. From the weights alone: how close each latent's decoder direction comes
to another's (duplicated latents), and how well each latent's encoder and decoder directions agree. And
SAEBench 0.6.0's core keys that our default metrics do not already give (`saebench_core_keys`), from the
weights and from the latents' firing frequencies on the eval rows.

Definitions: docs/metrics.md#core-extras
"""

from __future__ import annotations

import torch

DUPLICATE_COSINE = 0.9  # two latents whose decoder rows are this close count as duplicates
_BLOCK = 2048  # decoder rows compared at a time: the cosine matrix is formed block by block


@torch.no_grad()
def decoder_max_cosine(W_dec: torch.Tensor) -> torch.Tensor:  # noqa: N803 - the name every SAE library uses
    """For each latent, its decoder row's largest cosine with another latent's [d_sae]."""
    rows = W_dec.detach().float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = torch.empty(rows.shape[0], device=rows.device)
    for start in range(0, rows.shape[0], _BLOCK):
        block = rows[start : start + _BLOCK] @ rows.T  # [block, d_sae]
        block[torch.arange(block.shape[0]), torch.arange(start, start + block.shape[0])] = -1.0  # not itself
        best[start : start + _BLOCK] = block.max(dim=1).values
    return best


@torch.no_grad()
def encoder_decoder_cosine(W_enc: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """For each latent, the cosine between its encoder column and its decoder row [d_sae]."""
    enc, dec = W_enc.detach().float().T, W_dec.detach().float()
    return torch.nn.functional.cosine_similarity(enc, dec, dim=1)


def saebench_core_keys(sae, density) -> dict:
    """SAEBench 0.6.0's `misc_metrics` of its core eval (`calculate_misc_metrics`), under its names, from the
    eval rows' firing frequency of each latent (`density`, feature_density.npy): the fraction alive, the
    fractions of latents firing on more than 1% and 10% of tokens, and those latents' share of all firings
    (`normalized_...`); and the mean over latents of the largest cosine between its encoder column and
    another's. Its `average_max_decoder_cosine_sim` is our decoder_max_cosine_mean; its l1 is eval's l1."""
    frequency = torch.as_tensor(density, dtype=torch.float64)
    total = float(frequency.sum())

    def share_over(threshold: float) -> float:
        return float(frequency[frequency > threshold].sum()) / total if total > 0 else 0.0

    out = {
        "frac_alive": float((frequency > 0).double().mean()),
        "freq_over_1_percent": float((frequency > 0.01).double().mean()),
        "freq_over_10_percent": float((frequency > 0.1).double().mean()),
        "normalized_freq_over_1_percent": share_over(0.01),
        "normalized_freq_over_10_percent": share_over(0.1),
    }
    if not sae.n_layers and isinstance(getattr(sae, "W_enc", None), torch.Tensor):
        out["average_max_encoder_cosine_sim"] = float(decoder_max_cosine(sae.W_enc.T).mean())
    return out


def core_extras(sae) -> dict:
    """The weight-space metrics of an SAE with a single encoder and decoder (not a CLT's per-layer ones;
    a transcoder's encoder reads another space than its decoder writes, so it has no encoder-decoder
    cosine)."""
    if sae.n_layers or not isinstance(getattr(sae, "W_dec", None), torch.Tensor):
        return {}
    best = decoder_max_cosine(sae.W_dec)
    out = {
        "decoder_max_cosine_mean": float(best.mean()),
        "decoder_max_cosine_max": float(best.max()),
        "duplicate_fraction": float((best > DUPLICATE_COSINE).float().mean()),
    }
    if not getattr(sae, "transcodes", False) and isinstance(getattr(sae, "W_enc", None), torch.Tensor):
        cos = encoder_decoder_cosine(sae.W_enc, sae.W_dec)
        out |= {"encoder_decoder_cosine_mean": float(cos.mean()), "encoder_decoder_cosine_median": float(cos.median())}
    return out
