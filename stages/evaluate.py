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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.ablation import ablation_sparsity
from stages.basics import run_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.eval_metrics import ReconstructionStats, SparsityStats
from stages.saes import SparseAutoencoder
from stages.saes.external import ExternalSAE
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore, open_store
from store_schema.schema import stored_positions


def run_normalization(cfg: dict) -> Normalization:
    saved = cfg["normalization"]
    mean = None if saved.get("mean") is None else np.asarray(saved["mean"], np.float32)
    return Normalization(saved["mode"], mean, float(saved["scale"]), saved.get("max_norm"))


def check_hook_and_width(which: str, hook: str, d_in: int, store: ActivationStore) -> None:
    """`which` SAE (e.g. "the SAE") reads `hook` with width `d_in`: the store must hold them."""
    if hook not in store.hooks:
        raise SaepipeError(
            f"{which} reads hook '{hook}' but store {store.location} holds "
            f"{', '.join(store.hooks)}: pass --store with a store of that hook"
        )
    if d_in != store.d_model:
        raise SaepipeError(
            f"{which} has d_in {d_in} but store {store.location} has d_model {store.d_model}: "
            f"pass --store with activations of the SAE's model"
        )


def check_compatible(sae: SparseAutoencoder, cfg: dict, store: ActivationStore) -> None:
    check_hook_and_width("the SAE", cfg["hook"], sae.d_in, store)
    if store.header["model"]["name"] != cfg["store"]["model"]["name"]:
        raise SaepipeError(
            f"the SAE was trained on {cfg['store']['model']['name']} activations but the store holds "
            f"{store.header['model']['name']}: pass --store with a store of that model"
        )


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
) -> tuple[dict, np.ndarray]:
    """Reconstruction (in the store's normalized space, and on the raw activation scale) and sparsity on
    the held-out rows; and each latent's firing fraction."""
    n = store.n_rows("eval") if max_rows is None else min(max_rows, store.n_rows("eval"))
    if n == 0:
        raise SaepipeError(f"store {store.location} has no held-out rows: collect with --eval-fraction > 0")
    store_norm = store.normalization(hook)
    convert = not store_norm.same_transform(sae_norm)  # e.g. an external SAE, which reads raw activations
    normalized = ReconstructionStats(store.d_model, device)
    raw = ReconstructionStats(store.d_model, device)
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
            code = sae.encode(sae_in)
            rec = sae.decode(code)
            rec_raw = sae_norm.invert(rec, sae_row_stats)
            # the normalized-scale metrics are always in the store's space: one yardstick for every SAE
            normalized.add(x, _normalize_like_store(store_norm, rec_raw, row_stats) if convert else rec)
            raw.add(x_raw, rec_raw)
            sparsity.add(code)
    return ({"eval_rows": n, **normalized.result(), **raw.result("raw_"), **sparsity.result()}, sparsity.density())


def load_eval_model(store: ActivationStore, model_name: str | None, device: torch.device):
    """The host model for the downstream metrics: the store's own unless named, checked against it."""
    from stages.host_model.loading import load_host_model

    header = store.header
    name = model_name or header["model"]["name"]
    model = load_host_model(name, str(device), header["model"].get("dtype", "float32"))
    if model.d_model != store.d_model:
        raise SaepipeError(
            f"model {name} has d_model {model.d_model} but the store holds {store.d_model}: "
            f"pass --model with the model the store was collected from"
        )
    if model.revision != header["model"]["revision"]:
        print(
            f"warning: model {name} weights (revision {model.revision}) differ from the store's "
            f"({header['model']['revision']})",
            file=sys.stderr,
        )
    return model


def held_out_contexts(store: ActivationStore, max_tokens: int | None) -> np.ndarray:
    first = len(store.header["dropped_positions"])
    contexts = store.contexts("eval")
    if max_tokens is not None:
        contexts = contexts[: max(1, math.ceil(max_tokens / (store.context_size - first)))]
    if len(contexts) == 0:
        raise SaepipeError(f"store {store.location} has no held-out contexts: collect with --eval-fraction > 0")
    return contexts


def stored_mask(store: ActivationStore, token_ids: np.ndarray) -> np.ndarray:
    """[n, ctx] True where the store keeps a row (before the outlier check, which needs activations)."""
    header = store.header
    return stored_positions(token_ids, len(header["dropped_positions"]), header.get("excluded_tokens", []))


def downstream_metrics(
    sae: SparseAutoencoder,
    store: ActivationStore,
    hook: str,
    sae_norm: Normalization,
    model,
    device: torch.device,
    max_tokens: int | None,
    splice_from: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """CE loss and KL with the SAE spliced in, on held-out contexts replayed from the store's tokens, at
    every position the store would keep from `splice_from` on."""
    from stages.host_model.model import logits_with_hook_replaced, run_to_hooks

    contexts = held_out_contexts(store, max_tokens)
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

    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(contexts), batch_size), desc="eval ce/kl", disable=not progress, leave=False):
            ids = contexts[start : start + batch_size]
            token_ids = store.tokens.oindex[ids.tolist(), :]
            tokens = torch.from_numpy(token_ids.astype(np.int64)).to(device)
            # splice exactly where the store would have kept a row: stored positions, minus outliers
            stored = torch.from_numpy(stored_mask(store, token_ids)).to(device)
            stored[:, :splice_from] = False
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
            for key, other in (("kl", "sae"), ("kl_zero", "zero")):  # KL(clean || spliced) per token
                kl = (logp["clean"].exp() * (logp["clean"] - logp[other])).sum(dim=-1)
                totals[key] += float(kl.double().sum())
            count += targets.numel()
    if count == 0:
        raise SaepipeError("no held-out position was left to splice (all excluded or outliers): evaluate more --tokens")
    m = {k: v / count for k, v in totals.items()}
    gap = m["ce_zero"] - m["ce_clean"]
    m["ce_recovered"] = (m["ce_zero"] - m["ce_sae"]) / gap if gap != 0 else float("nan")
    m["kl_div_score"] = (m["kl_zero"] - m["kl"]) / m["kl_zero"] if m["kl_zero"] != 0 else float("nan")
    m["delta_loss"] = m["ce_sae"] - m["ce_clean"]
    m["downstream_tokens"] = count
    m["downstream_contexts"] = len(contexts)
    m["splice_from"] = splice_from
    m["model"] = model.name
    return m


@dataclass
class EvaluatedSAE:
    """What eval, report and compare need of a run folder: the SAE, the normalization mapping raw
    activations into the SAE's input space, the hook and the store it is evaluated on."""

    path: Path
    sae: SparseAutoencoder
    normalization: Normalization
    hook: str
    store_path: str
    model_name: str
    label: str  # a short name for tables and plots


def open_evaluated(run: str | Path, device: torch.device | str = "cpu", store_path: str | None = None) -> EvaluatedSAE:
    """A trained run folder (cfg.json + sae.safetensors), or an eval folder of an external SAE."""
    path = Path(run)
    if (path / run_dir.EXTERNAL).exists() and not (path / run_dir.CONFIG).exists():
        saved = run_dir.read_json(path / run_dir.EXTERNAL, "evaluate the SAE again with --external and --store")
        return open_external(saved["saelens_dir"], store_path or saved["store"], path, device)
    sae, cfg = run_dir.load_sae(path, device)
    store = store_path or cfg["store"]["path"]
    return EvaluatedSAE(path, sae, run_normalization(cfg), cfg["hook"], store, cfg["store"]["model"]["name"], path.name)


def open_external(saelens_dir: str | Path, store_path: str, out: Path, device: torch.device | str) -> EvaluatedSAE:
    """A SAELens-format SAE folder (cfg.json + sae_weights.safetensors), to be measured on our store. It
    reads raw activations, so its normalization is the identity, keeping the store's outlier bound: it is
    spliced and scored exactly where the store keeps rows."""
    folder = Path(saelens_dir)
    if not (folder / "cfg.json").exists() or not (folder / "sae_weights.safetensors").exists():
        raise SaepipeError(
            f"{folder} is not a SAELens SAE folder (cfg.json and sae_weights.safetensors): "
            f"pass the folder SAELens's save_model / save_inference_model wrote"
        )
    try:
        from sae_lens import SAE
    except ImportError as e:
        raise SaepipeError("evaluating a SAELens SAE needs sae-lens: pip install 'sae-lens>=6'") from e
    store = open_store(store_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = SAE.load_from_disk(str(folder), device=str(device))
    sae = ExternalSAE(inner)
    hook = inner.cfg.metadata.hook_name
    check_hook_and_width(f"the SAE at {folder}", hook, sae.d_in, store)
    identity = Normalization("none", max_norm=store.normalization(hook).max_norm)
    return EvaluatedSAE(
        out, sae, identity, hook, store.location, store.header["model"]["name"], f"{folder.name} (external)"
    )


def run_eval(
    run: str,
    store_path: str | None = None,
    model: str | None = None,
    tokens: int | None = None,
    use_model: bool = True,
    device: str = "auto",
    progress: bool = True,
    splice_from: int = 0,
    ablation_contexts: int = 4,
    external: str | None = None,
) -> dict:
    """Evaluate the run folder `run` (or, with `external`, a SAELens SAE folder, writing into `run`)
    and write eval.json and the per-latent firing fractions there."""
    if tokens is not None and tokens < 1:
        raise SaepipeError(f"--tokens must be at least 1, got {tokens} (leave it out to use every held-out row)")
    if ablation_contexts < 0:
        raise SaepipeError(
            f"--ablation-contexts must be at least 0 (0 skips ablation sparsity), got {ablation_contexts}"
        )
    run_path = Path(run)
    dev = resolve_device(device)
    if external is not None:
        if store_path is None:
            raise SaepipeError("--external needs --store: the store to evaluate the SAE on")
        if (run_path / run_dir.CONFIG).exists():
            raise SaepipeError(f"{run_path} is a training run: give --external another folder to write into")
        evaluated = open_external(external, store_path, run_path, dev)
        run_path.mkdir(parents=True, exist_ok=True)
        run_dir.write_json_atomic(
            run_path / run_dir.EXTERNAL, {"saelens_dir": str(Path(external).resolve()), "store": evaluated.store_path}
        )
    else:
        evaluated = open_evaluated(run_path, dev, store_path)
    store = open_store(evaluated.store_path)
    store.require_complete()
    if (run_path / run_dir.CONFIG).exists():
        check_compatible(evaluated.sae, run_dir.load_config(run_path), store)
    if splice_from < 0 or splice_from >= store.context_size:
        raise SaepipeError(f"--splice-from {splice_from} is outside the context (0 to {store.context_size - 1})")
    sae, norm, hook = evaluated.sae, evaluated.normalization, evaluated.hook
    result = {
        "run": str(run_path),
        "store": store.location,
        "store_fingerprint": store.fingerprint,
        "hook": hook,
        "sae": sae.config(),
    }
    metrics, density = store_metrics(sae, store, hook, norm, dev, tokens, progress)
    result |= metrics
    if use_model:
        host = load_eval_model(store, model, dev)
        result |= downstream_metrics(sae, store, hook, norm, host, dev, tokens, splice_from, progress=progress)
        if ablation_contexts > 0:
            ids = held_out_contexts(store, None)[:ablation_contexts]
            token_rows = store.tokens.oindex[ids.tolist(), :]
            result |= ablation_sparsity(
                sae, norm, host, token_rows, stored_mask(store, token_rows), hook, progress=progress
            )
    run_dir.save_npy_atomic(run_path / run_dir.FEATURE_DENSITY, density)
    run_dir.write_json_atomic(run_path / run_dir.EVAL, result)
    return result


TABLE_KEYS = (
    "mse",
    "nmse",
    "fve",
    "fve_per_token",
    "fve_vs_zero",
    "cosine",
    "l2_ratio",
    "relative_reconstruction_bias",
    "raw_mse",
    "raw_fve",
    "raw_cosine",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_recovered",
    "kl",
    "kl_div_score",
    "delta_loss",
    "ablation_sparsity",
)


def format_table(result: dict) -> str:
    lines = [f"{'metric':<30}{'value':>14}", "-" * 44]
    for key in TABLE_KEYS:
        if key in result:
            lines.append(f"{key:<30}{result[key]:>14.5g}")
    if "l0_quantiles" in result:
        q = result["l0_quantiles"]
        lines.append(f"{'l0 p10 / p50 / p90':<30}{q['p10']:>6} /{q['p50']:>3} /{q['p90']:>3}")
    lines.append(f"{'eval rows':<30}{result['eval_rows']:>14,}")
    if "downstream_tokens" in result:
        lines.append(f"{'ce/kl tokens':<30}{result['downstream_tokens']:>14,}")
    if "ablation_count" in result:
        lines.append(f"{'ablations':<30}{result['ablation_count']:>14,}")
    return "\n".join(lines)
