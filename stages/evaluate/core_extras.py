"""Weight-space metrics of an SAE, computed from its weights alone (eval's `--suite core` adds them): how
close each latent's decoder direction comes to another's (duplicated latents), and how well each
latent's encoder and decoder directions agree.

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


def core_extras(sae) -> dict:
    """The weight-space metrics of an SAE with a single encoder and decoder (not a CLT's per-layer ones;
    a transcoder's encoder reads another space than its decoder writes, so it has no encoder-decoder
    cosine)."""
    if getattr(sae, "n_layers", None) or not isinstance(getattr(sae, "W_dec", None), torch.Tensor):
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
