"""SAEs for the tests that need one with trained-looking weights without training it."""

import torch


def trained_like(sae, seed=0):
    """Nonzero biases, an encoder that is not the decoder's transpose, and a learned threshold (0.2) where
    the SAE keeps one as a tensor (BatchTopK, Matryoshka)."""
    gen = torch.Generator().manual_seed(seed)
    sae.reset_parameters(gen)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.d_sae, generator=gen))
        sae.b_dec.copy_(0.3 * torch.randn(sae.d_in, generator=gen))
        sae.W_enc.add_(0.05 * torch.randn(sae.d_in, sae.d_sae, generator=gen))
        if isinstance(getattr(sae, "threshold", None), torch.Tensor):
            sae.threshold.fill_(0.2)
    return sae
