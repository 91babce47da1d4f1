"""Evaluate a trained SAE on the store's held-out split, and (with the model) downstream.

Store-only metrics are computed on normalized rows (the space the SAE works in). Downstream metrics
replay held-out contexts from the store's `tokens` through the host model, splice the SAE's
de-normalized reconstruction in at the hook exactly where the store keeps rows (not a dropped
position, not an excluded special token, not a massive-activation outlier), and compare the next-token
predictions made from those positions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import run_dir
from pipeline.device import resolve_device
from pipeline.errors import SaepipeError
from stages.saes import SparseAutoencoder
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore, open_store
from store_schema.schema import stored_positions

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens counts as dense


def run_normalization(cfg: dict) -> Normalization:
    saved = cfg["normalization"]
    mean = None if saved.get("mean") is None else np.asarray(saved["mean"], np.float32)
    return Normalization(saved["mode"], mean, float(saved["scale"]), saved.get("max_norm"))


def check_compatible(sae: SparseAutoencoder, cfg: dict, store: ActivationStore) -> None:
    hook = cfg["hook"]
    if hook not in store.hooks:
        raise SaepipeError(f"the SAE was trained on hook '{hook}' but store {store.location} holds "
                           f"{', '.join(store.hooks)}: pass --store with a store of that hook")
    if sae.d_in != store.d_model:
        raise SaepipeError(f"the SAE's d_in ({sae.d_in}) does not match the store's d_model ({store.d_model}): "
                           f"pass --store with activations of the model the SAE was trained on")
    if store.header["model"]["name"] != cfg["store"]["model"]["name"]:
        raise SaepipeError(f"the SAE was trained on {cfg['store']['model']['name']} activations but the store holds "
                           f"{store.header['model']['name']}: pass --store with a store of that model")


def _same(a: Normalization, b: Normalization) -> bool:
    return a.mode == b.mode and a.scale == b.scale and a.max_norm == b.max_norm and (
        (a.mean is None and b.mean is None) or (a.mean is not None and b.mean is not None and np.array_equal(a.mean, b.mean)))


def store_metrics(sae: SparseAutoencoder, store: ActivationStore, hook: str, sae_norm: Normalization,
                  device: torch.device, max_rows: int | None = None, progress: bool = True) -> dict:
    """Reconstruction and sparsity on the held-out rows, in the SAE's normalized space."""
    n = store.n_rows("eval") if max_rows is None else min(max_rows, store.n_rows("eval"))
    if n == 0:
        raise SaepipeError(f"store {store.location} has no held-out rows: collect with --eval-fraction > 0")
    store_norm = store.normalization(hook)
    convert = not _same(store_norm, sae_norm)
    if convert and store_norm.has_row_stats:
        raise SaepipeError("the store's token normalization differs from the SAE's: evaluate on the SAE's own store")
    d = store.d_model
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    sq_err = torch.zeros((), dtype=torch.float64, device=device)
    cos_sum = torch.zeros((), dtype=torch.float64, device=device)
    l0_sum = torch.zeros((), dtype=torch.float64, device=device)
    l0_hist = torch.zeros(sae.d_sae + 1, dtype=torch.long, device=device)
    fires = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    step = store.chunk_rows
    with torch.inference_mode():
        for start in tqdm(range(0, n, step), desc="eval rows", disable=not progress, leave=False):
            x = torch.from_numpy(store.read_rows("eval", hook, start, min(start + step, n))).to(device).float()
            if convert:
                x = sae_norm.apply(store_norm.invert(x))[0]
            code = sae.encode(x)
            rec = sae.decode(code)
            sum_x += x.sum(dim=0).double()
            sum_sq += x.double().pow(2).sum()
            sq_err += (rec - x).double().pow(2).sum()
            cos_sum += torch.nn.functional.cosine_similarity(rec, x, dim=-1).double().sum()
            l0 = code.l0()
            l0_sum += l0.sum()
            l0_hist += torch.bincount(l0, minlength=sae.d_sae + 1)
            fires += code.fire_counts(sae.d_sae)
    total_var = sum_sq - sum_x.pow(2).sum() / n  # Σ‖x − mean‖²
    nmse = float(sq_err / total_var)
    density = fires.double() / n
    return {"eval_rows": n, "mse": float(sq_err) / (n * d), "nmse": nmse, "fve": 1 - nmse,
            "cosine": float(cos_sum) / n, "l0": float(l0_sum) / n,
            "dead_fraction": float((fires == 0).double().mean()),
            "dense_fraction": float((density > DENSE_THRESHOLD).double().mean())}


def downstream_metrics(sae: SparseAutoencoder, store: ActivationStore, hook: str, sae_norm: Normalization,
                       model_name: str | None, device: torch.device, max_tokens: int | None,
                       batch_size: int = 8, progress: bool = True) -> dict:
    """CE loss and KL with the SAE spliced in, on held-out contexts replayed from the store's tokens."""
    from pipeline.host_models import load_host_model, logits_with_hook_replaced, run_to_hooks

    header = store.header
    name = model_name or header["model"]["name"]
    model = load_host_model(name, str(device), header["model"].get("dtype", "float32"))
    if model.d_model != store.d_model:
        raise SaepipeError(f"model {name} has d_model {model.d_model} but the store holds {store.d_model}: "
                           f"pass --model with the model the store was collected from")
    if model.revision != header["model"]["revision"]:
        print(f"warning: model {name} weights (revision {model.revision}) differ from the store's "
              f"({header['model']['revision']})", file=sys.stderr)
    first = len(header["dropped_positions"])
    contexts = store.contexts("eval")
    if max_tokens is not None:
        contexts = contexts[:max(1, math.ceil(max_tokens / (store.context_size - first)))]
    if len(contexts) == 0:
        raise SaepipeError(f"store {store.location} has no held-out contexts: collect with --eval-fraction > 0")
    sae_dtype = next(sae.parameters()).dtype
    spliced: torch.Tensor | None = None  # [batch, ctx] positions of the current batch the SAE replaces

    def splice_sae(act: torch.Tensor) -> torch.Tensor:
        x = act[spliced].float()
        x_hat, row_stats = sae_norm.apply(x)
        rec = sae(x_hat.to(sae_dtype)).float()
        out = act.clone()
        out[spliced] = sae_norm.invert(rec, row_stats).to(act.dtype)
        return out

    def zero_ablate(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[spliced] = 0
        return out

    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl": 0.0}
    count = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(contexts), batch_size), desc="eval ce/kl", disable=not progress, leave=False):
            ids = contexts[start:start + batch_size]
            token_ids = store.tokens.oindex[ids.tolist(), :]
            tokens = torch.from_numpy(token_ids.astype(np.int64)).to(device)
            # splice exactly where the store would have kept a row: stored positions, minus outliers
            stored = torch.from_numpy(stored_positions(token_ids, first, header.get("excluded_tokens", []))).to(device)
            clean_act = run_to_hooks(model, tokens, [hook])[hook]
            spliced = stored & sae_norm.inliers(clean_act)
            # next-token predictions made from spliced positions (the last position predicts nothing)
            scored = spliced[:, :-1]
            targets = tokens[:, 1:][scored]
            logp = {}
            for key, replace in (("clean", None), ("sae", splice_sae), ("zero", zero_ablate)):
                logits = logits_with_hook_replaced(model, tokens, hook, replace)[:, :-1][scored]
                logp[key] = torch.log_softmax(logits.float(), dim=-1)
            for key in ("clean", "sae", "zero"):
                nll = -logp[key].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                totals[f"ce_{key}"] += float(nll.double().sum())
            kl = (logp["clean"].exp() * (logp["clean"] - logp["sae"])).sum(dim=-1)
            totals["kl"] += float(kl.double().sum())
            count += targets.numel()
    if count == 0:
        raise SaepipeError("no held-out position was left to splice (all excluded or outliers): evaluate more --tokens")
    m = {k: v / count for k, v in totals.items()}
    gap = m["ce_zero"] - m["ce_clean"]
    m["ce_recovered"] = (m["ce_zero"] - m["ce_sae"]) / gap if gap != 0 else float("nan")
    m["delta_loss"] = m["ce_sae"] - m["ce_clean"]
    m["downstream_tokens"] = count
    m["downstream_contexts"] = len(contexts)
    m["model"] = name
    return m


def run_eval(run: str, store_path: str | None = None, model: str | None = None, tokens: int | None = None,
             use_model: bool = True, device: str = "auto", progress: bool = True) -> dict:
    run_path = Path(run)
    dev = resolve_device(device)
    sae, cfg = run_dir.load_sae(run_path, dev)
    store = open_store(store_path or cfg["store"]["path"])
    store.require_complete()
    check_compatible(sae, cfg, store)
    sae_norm = run_normalization(cfg)
    hook = cfg["hook"]
    result = {"run": str(run_path), "store": store.location, "store_fingerprint": store.fingerprint,
              "hook": hook, "sae": cfg["sae"]}
    result |= store_metrics(sae, store, hook, sae_norm, dev, tokens, progress)
    if use_model:
        result |= downstream_metrics(sae, store, hook, sae_norm, model, dev, tokens, progress=progress)
    run_dir.write_json_atomic(run_path / run_dir.EVAL, result)
    return result


TABLE_KEYS = ("mse", "nmse", "fve", "cosine", "l0", "dead_fraction", "dense_fraction",
              "ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl", "delta_loss")


def format_table(result: dict) -> str:
    lines = [f"{'metric':<16}{'value':>14}", "-" * 30]
    for key in TABLE_KEYS:
        if key in result:
            lines.append(f"{key:<16}{result[key]:>14.5g}")
    lines.append(f"{'eval rows':<16}{result['eval_rows']:>14,}")
    if "downstream_tokens" in result:
        lines.append(f"{'ce/kl tokens':<16}{result['downstream_tokens']:>14,}")
    return "\n".join(lines)
