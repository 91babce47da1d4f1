"""Eval of the architectures that read and write several hooks at once: a crosscoder (one latent space over
its hooks) and a cross-layer transcoder (each layer's MLP input to its own and every later MLP output).

Store metrics: reconstruction of each written hook and of all of them together (in the store's normalized
space, and on the raw scale), L0 and dead fraction overall and, for a CLT, per layer. Downstream (CLT only):
CE loss and KL with the CLT's predictions spliced in for every MLP output of its range at once, each layer's
prediction made from the MLP inputs of that same spliced pass.

Definitions: docs/metrics.md#crosscoders-and-cross-layer-transcoders
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.evaluate.accumulators import ReconstructionStats, SparsityStats
from stages.evaluate.downstream import spliced_positions_metrics
from stages.host_model.model import hook_layer, logits_with_hook_replaced, logits_with_hooks_predicted
from stages.saes import SparseAutoencoder
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore

PER_HOOK_KEYS = ("fve", "nmse", "cosine", "raw_fve", "raw_mse")


def multi_hook_store_metrics(
    sae: SparseAutoencoder,
    store: ActivationStore,
    in_hooks: tuple[str, ...],
    out_hooks: tuple[str, ...],
    norms: dict[str, Normalization],
    device: torch.device,
    max_rows: int | None = None,
    progress: bool = True,
) -> tuple[dict, np.ndarray]:
    """Reconstruction of every written hook (`per_hook`) and of all of them side by side (the top-level
    keys), sparsity, and for a CLT `per_layer` L0 and dead fraction; and each latent's firing fraction."""
    n = store.n_rows("eval") if max_rows is None else min(max_rows, store.n_rows("eval"))
    if n == 0:
        raise SaepipeError(f"store {store.location} has no held-out rows: collect with --eval-fraction > 0")
    for hook in dict.fromkeys(in_hooks + out_hooks):
        if not store.normalization(hook).same_transform(norms[hook]):
            raise SaepipeError(
                f"store {store.location} normalizes {hook} otherwise than the run's store did: "
                f"evaluate on the store it was trained on (or a copy)"
            )
    widths = [store.width(hook) for hook in out_hooks]
    joined, joined_raw = ReconstructionStats(sum(widths), device), ReconstructionStats(sum(widths), device)
    normalized = {hook: ReconstructionStats(w, device) for hook, w in zip(out_hooks, widths)}
    raw = {hook: ReconstructionStats(w, device) for hook, w in zip(out_hooks, widths)}
    sparsity = SparsityStats(sae.d_sae, device)
    n_layers = sae.n_layers  # a CLT's latents are numbered layer by layer
    layer_l0 = torch.zeros(n_layers or 0, dtype=torch.float64, device=device)

    def rows(hook: str, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(store.read_rows("eval", hook, start, stop)).to(device).float()

    step = store.chunk_rows
    with torch.inference_mode():
        for start in tqdm(range(0, n, step), desc="eval rows", disable=not progress, leave=False):
            stop = min(start + step, n)
            x = torch.cat([rows(hook, start, stop) for hook in in_hooks], dim=1)
            y = x if in_hooks == out_hooks else torch.cat([rows(hook, start, stop) for hook in out_hooks], dim=1)
            code = sae.encode(x)
            rec = sae.output(x, code)
            joined.add(y, rec)
            y_raw, rec_raw = [], []
            for hook, y_h, rec_h in zip(out_hooks, y.split(widths, dim=1), rec.split(widths, dim=1)):
                normalized[hook].add(y_h, rec_h)
                row_stats = store.read_row_stats("eval", hook, start, stop)
                row_stats = None if row_stats is None else torch.from_numpy(row_stats).to(device)
                y_raw.append(norms[hook].invert(y_h, row_stats))
                rec_raw.append(norms[hook].invert(rec_h, row_stats))
                raw[hook].add(y_raw[-1], rec_raw[-1])
            joined_raw.add(torch.cat(y_raw, dim=1), torch.cat(rec_raw, dim=1))
            sparsity.add(code)
            if n_layers:
                layer_l0 += sae.active_per_layer(code).double()
    density = sparsity.density()
    result = {"eval_rows": n, **joined.result(), **joined_raw.result("raw_"), **sparsity.result()}
    result["per_hook"] = {
        hook: {key: {**normalized[hook].result(), **raw[hook].result("raw_")}[key] for key in PER_HOOK_KEYS}
        for hook in out_hooks
    }
    if n_layers:
        result["per_layer"] = {
            "layer": [hook_layer(hook) for hook in out_hooks],
            "hook": list(out_hooks),
            "l0": (layer_l0 / n).tolist(),
            "dead_fraction": (density.reshape(n_layers, -1) == 0).mean(axis=1).tolist(),
            "fve": [result["per_hook"][hook]["fve"] for hook in out_hooks],
        }
    return result, density


def clt_downstream_metrics(
    clt,
    store: ActivationStore,
    in_hooks: tuple[str, ...],
    out_hooks: tuple[str, ...],
    norms: dict[str, Normalization],
    model,
    device: torch.device,
    max_tokens: int | None,
    splice_from: int = 0,
    progress: bool = True,
) -> dict:
    """CE loss and KL with the CLT spliced in for every MLP output of its range at once (ce_zero: all of
    them zero-ablated), at the positions the store keeps for every one of its hooks."""
    dtype = next(clt.parameters()).dtype
    codes: list = []  # the codes of the layers spliced so far in the current pass

    def predict_rows(layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            codes.clear()
        codes.append(clt.encode_layer(layer, norms[in_hooks[layer]].apply(x)[0].to(dtype)))
        return norms[out_hooks[layer]].invert(clt.layer_output(layer, codes).float())

    return layers_spliced_metrics(
        store, model, device, max_tokens, splice_from, list(zip(in_hooks, out_hooks)), norms, predict_rows, progress
    )


def transcoder_set_downstream_metrics(
    transcoders: list,
    store: ActivationStore,
    model,
    device: torch.device,
    max_tokens: int | None,
    splice_from: int = 0,
    progress: bool = True,
) -> dict:
    """CE loss and KL with a set of transcoders (EvaluatedSAEs, one per layer, in layer order) spliced in for
    their MLP outputs at once, each predicting from the MLP input of the same spliced pass."""
    norms = {t.read_hook: t.read_normalization for t in transcoders} | {t.hook: t.normalization for t in transcoders}

    def predict_rows(i: int, x: torch.Tensor) -> torch.Tensor:
        t = transcoders[i]
        dtype = next(t.sae.parameters()).dtype
        return t.normalization.invert(t.sae(t.read_normalization.apply(x)[0].to(dtype)).float())

    pairs = [(t.read_hook, t.hook) for t in transcoders]
    return layers_spliced_metrics(store, model, device, max_tokens, splice_from, pairs, norms, predict_rows, progress)


def layers_spliced_metrics(
    store: ActivationStore,
    model,
    device: torch.device,
    max_tokens: int | None,
    splice_from: int,
    pairs: list[tuple[str, str]],
    norms: dict[str, Normalization],
    predict_rows,
    progress: bool,
) -> dict:
    """CE loss and KL with, for each (read hook, hook) of `pairs` in the order they fire, `hook`'s raw rows
    at the spliced positions replaced by predict_rows(i, the read hook's raw rows there) (ce_zero: every
    `hook` zero-ablated there)."""
    state: dict = {}

    def predict(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spliced, out = state["spliced"], y.clone()
        out[spliced] = predict_rows(i, x[spliced].float()).to(y.dtype)
        return out

    def zero(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = y.clone()
        out[state["spliced"]] = 0
        return out

    def logits(tokens: torch.Tensor, key: str, spliced: torch.Tensor) -> torch.Tensor:
        state["spliced"] = spliced
        if key == "clean":  # a plain forward pass: no hook installed
            return logits_with_hook_replaced(model, tokens, pairs[0][1], None)
        return logits_with_hooks_predicted(model, tokens, pairs, predict if key == "sae" else zero)

    hooks = list(dict.fromkeys(hook for pair in pairs for hook in pair))
    return spliced_positions_metrics(
        store, model, device, max_tokens, splice_from, hooks, norms, logits, progress=progress
    )
