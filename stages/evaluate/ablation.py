"""Sparsity of ablation effects (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", 4.5).

Protocol (docs/metrics.md has the full definition): in each sampled held-out context, at one seeded
random stored position p, the SAE's reconstruction is spliced in at p (every other position stays
clean). Each latent active at p is then removed from the code in turn, and the logits at positions
p .. p+T-1 are compared with those of the unablated reconstruction: a difference Δ of shape [T, V].
Each position's median over the vocabulary is subtracted (a uniform shift of all logits changes no
prediction), and the ablation's sparsity is (‖Δ‖₁ / ‖Δ‖₂)² / (V·T): 1/(V·T) when a single logit moves,
1 when all move alike. The metric is the mean over all ablations.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from stages.host_model.model import logits_with_hook_replaced, run_to_hooks
from stages.saes import SparseAutoencoder
from stages.saes.base import DenseCode
from store_schema.normalization import Normalization


def ablation_sparsity(
    sae: SparseAutoencoder,
    sae_norm: Normalization,
    model,
    token_rows: np.ndarray,
    stored: np.ndarray,
    hook: str,
    future_tokens: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """`token_rows` [n, ctx] are held-out contexts and `stored` [n, ctx] marks the positions a store keeps
    (the only positions ablated). Returns the mean sparsity, its spread and the number of ablations."""
    rng = np.random.default_rng(seed)
    device = next(sae.parameters()).device
    sae_dtype = next(sae.parameters()).dtype
    scores: list[float] = []
    for row, keep in tqdm(list(zip(token_rows, stored)), desc="ablation sparsity", disable=not progress, leave=False):
        candidates = np.flatnonzero(keep)
        if not len(candidates):
            continue
        p = int(rng.choice(candidates))
        end = min(len(row), p + future_tokens)
        tokens = torch.from_numpy(row[None, :end].astype(np.int64)).to(device)
        with torch.inference_mode():
            act = run_to_hooks(model, tokens, [hook])[hook][0, p].float()
            if not bool(sae_norm.inliers(act)):
                continue  # a massive-activation row: the store never keeps it
            x, row_stats = sae_norm.apply(act[None])
            code = sae.encode(x.to(sae_dtype)).dense(sae.d_sae)[0]
            active = torch.nonzero(code).squeeze(-1)
            if not len(active):
                continue
            codes = code.repeat(len(active) + 1, 1)  # row 0: the whole code; row j: latent active[j-1] removed
            codes[torch.arange(1, len(active) + 1, device=device), active] = 0
            spliced = sae_norm.invert(
                sae.decode(DenseCode(codes)).float(), None if row_stats is None else row_stats.expand(len(codes), -1)
            )

        logits = logits_with_hook_replaced(model, tokens.expand(len(codes), -1), hook, _splice_at(p, spliced))
        logits = logits[:, p:end].double()
        delta = logits[1:] - logits[:1]
        delta -= delta.median(dim=-1, keepdim=True).values
        l1, l2 = delta.abs().sum(dim=(1, 2)), delta.pow(2).sum(dim=(1, 2)).sqrt()
        moved = l2 > 0  # a latent whose removal changes nothing has no defined sparsity
        size = delta.shape[1] * delta.shape[2]
        scores += ((l1[moved] / l2[moved]).pow(2) / size).tolist()
    if not scores:
        return {"ablation_sparsity": None, "ablation_count": 0, "ablation_future_tokens": future_tokens}
    values = np.asarray(scores)
    return {
        "ablation_sparsity": float(values.mean()),
        "ablation_sparsity_median": float(np.median(values)),
        "ablation_count": len(values),
        "ablation_future_tokens": future_tokens,
    }


def _splice_at(position: int, rows: torch.Tensor):
    """A hook replacement putting rows[i] at `position` of batch row i, the rest of the activations kept."""

    def splice(acts: torch.Tensor) -> torch.Tensor:
        out = acts.clone()
        out[:, position] = rows.to(acts.dtype)
        return out

    return splice
