"""Store-only metrics on the held-out rows: reconstruction (in the store's normalized space and on the raw
scale) and sparsity."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.evaluate.accumulators import ReconstructionStats, SparsityStats
from stages.saes import SparseAutoencoder
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore


def _normalize_like_store(store_norm: Normalization, raw: torch.Tensor, row_stats: torch.Tensor | None) -> torch.Tensor:
    """Raw rows into the store's normalized space, with the stored rows' own (mean, scale) in token mode."""
    if store_norm.has_row_stats:
        return (raw - row_stats[:, 0:1]) / row_stats[:, 1:2]
    return store_norm.apply(raw)[0]


def store_metrics(
    sae: SparseAutoencoder,
    store: ActivationStore,
    hook: str,
    sae_norm: Normalization,
    device: torch.device,
    max_rows: int | None = None,
    progress: bool = True,
    read_hook: str | None = None,
) -> tuple[dict, np.ndarray]:
    """Reconstruction (in the store's normalized space, and on the raw activation scale) and sparsity on
    the held-out rows; and each latent's firing fraction. With `read_hook` (a transcoder of ours), the SAE
    reads that hook's rows and its output is scored against `hook`'s."""
    n = store.n_rows("eval") if max_rows is None else min(max_rows, store.n_rows("eval"))
    if n == 0:
        raise SaepipeError(f"store {store.location} has no held-out rows: collect with --eval-fraction > 0")
    store_norm = store.normalization(hook)
    convert = not store_norm.same_transform(sae_norm)  # e.g. an external SAE, which reads raw activations
    normalized = ReconstructionStats(store.width(hook), device)
    raw = ReconstructionStats(store.width(hook), device)
    sparsity = SparsityStats(sae.d_sae, device)
    step = store.chunk_rows
    with torch.inference_mode():
        for start in tqdm(range(0, n, step), desc="eval rows", disable=not progress, leave=False):
            stop = min(start + step, n)
            x = torch.from_numpy(store.read_rows("eval", hook, start, stop)).to(device).float()
            row_stats = store.read_row_stats("eval", hook, start, stop)
            row_stats = None if row_stats is None else torch.from_numpy(row_stats).to(device)
            x_raw = store_norm.invert(x, row_stats)
            sae_in, sae_row_stats = sae_norm.apply(x_raw) if convert else (x, row_stats)
            if read_hook is not None:  # a transcoder reads the input hook's stored rows
                sae_in = torch.from_numpy(store.read_rows("eval", read_hook, start, stop)).to(device).float()
            code = sae.encode(sae_in)
            rec = sae.output(sae_in, code)
            rec_raw = sae_norm.invert(rec, sae_row_stats)
            # the normalized-scale metrics are always in the store's space: one yardstick for every SAE
            normalized.add(x, _normalize_like_store(store_norm, rec_raw, row_stats) if convert else rec)
            raw.add(x_raw, rec_raw)
            sparsity.add(code)
    return ({"eval_rows": n, **normalized.result(), **raw.result("raw_"), **sparsity.result()}, sparsity.density())
