"""CE loss and KL with the SAE spliced into the host model, on held-out contexts replayed from the store's
tokens, exactly where the store keeps rows (not a dropped position, not an excluded special token, not
a massive-activation outlier)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from stages.basics.errors import SaepipeError
from stages.host_model.loading import load_host_model
from stages.host_model.model import logits_with_hook_predicted, logits_with_hook_replaced, run_to_hooks
from stages.saes import SparseAutoencoder
from store_schema.normalization import Normalization
from store_schema.reader import ActivationStore
from store_schema.schema import stored_positions


def load_eval_model(store: ActivationStore, model_name: str | None, device: torch.device):
    """The host model for the downstream metrics: the store's own unless named, checked against it."""
    header = store.header
    name = model_name or header.model.name
    model = load_host_model(name, str(device), header.model.dtype)
    if model.d_model != store.d_model:
        raise SaepipeError(
            f"model {name} has d_model {model.d_model} but the store holds {store.d_model}: "
            f"pass --model with the model the store was collected from"
        )
    if model.revision != header.model.revision:
        print(
            f"warning: model {name} weights (revision {model.revision}) differ from the store's "
            f"({header.model.revision})",
            file=sys.stderr,
        )
    return model


def held_out_contexts(store: ActivationStore, max_tokens: int | None) -> np.ndarray:
    first = store.header.first_stored_position
    contexts = store.contexts("eval")
    if max_tokens is not None:
        contexts = contexts[: max(1, math.ceil(max_tokens / (store.context_size - first)))]
    if len(contexts) == 0:
        raise SaepipeError(f"store {store.location} has no held-out contexts: collect with --eval-fraction > 0")
    return contexts


def positions_kept(store: ActivationStore, token_ids: np.ndarray) -> np.ndarray:
    """[n, ctx] True where the store keeps a row (before the outlier check, which needs activations)."""
    header = store.header
    return stored_positions(token_ids, header.first_stored_position, list(header.excluded_tokens))


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
    read: tuple[str, Normalization] | None = None,
) -> dict:
    """CE loss and KL with the SAE spliced in, on held-out contexts replayed from the store's tokens, at
    every position the store would keep from `splice_from` on. `read`: a transcoder's input hook and its
    normalization; its prediction from that hook replaces `hook`'s activation (an MLP's output)."""
    sae_dtype = next(sae.parameters()).dtype

    def splice_sae(spliced: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = act[spliced].float()
        x_hat, row_stats = sae_norm.apply(x)
        rec = sae(x_hat.to(sae_dtype)).float()
        out = act.clone()
        out[spliced] = sae_norm.invert(rec, row_stats).to(act.dtype)
        return out

    def predict(spliced: torch.Tensor, read_act: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x_hat, _ = read[1].apply(read_act[spliced].float())
        out = act.clone()
        out[spliced] = sae_norm.invert(sae(x_hat.to(sae_dtype)).float()).to(act.dtype)
        return out

    def zero_ablate(spliced: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[spliced] = 0
        return out

    def logits(tokens: torch.Tensor, key: str, spliced: torch.Tensor) -> torch.Tensor:
        if key == "sae" and read is not None:
            return logits_with_hook_predicted(model, tokens, read[0], hook, lambda x, y: predict(spliced, x, y))
        replace = {"clean": None, "sae": splice_sae, "zero": zero_ablate}[key]
        return logits_with_hook_replaced(
            model, tokens, hook, None if replace is None else lambda act: replace(spliced, act)
        )

    # a transcoder splices only where the store keeps its input's rows too
    norms = {hook: sae_norm} | ({} if read is None else {read[0]: read[1]})
    return spliced_positions_metrics(
        store, model, device, max_tokens, splice_from, list(norms), norms, logits, batch_size, progress
    )


def spliced_positions_metrics(
    store: ActivationStore,
    model,
    device: torch.device,
    max_tokens: int | None,
    splice_from: int,
    hooks: list[str],
    norms: dict[str, Normalization],
    logits: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor],
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """CE loss and KL of `logits(tokens, key, spliced)` for key "clean", "sae" (the SAE's output spliced in)
    and "zero" (the activation zero-ablated), where `spliced` [batch, ctx] marks the positions replaced:
    those the store keeps from `splice_from` on, where every one of `hooks` is an inlier of its
    normalization (checked on a clean pass)."""
    contexts = held_out_contexts(store, max_tokens)
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(contexts), batch_size), desc="eval ce/kl", disable=not progress, leave=False):
            ids = contexts[start : start + batch_size]
            token_ids = store.tokens.oindex[ids.tolist(), :]
            tokens = torch.from_numpy(token_ids.astype(np.int64)).to(device)
            # splice exactly where the store would have kept a row: stored positions, minus outliers
            spliced = torch.from_numpy(positions_kept(store, token_ids)).to(device)
            spliced[:, :splice_from] = False
            clean = run_to_hooks(model, tokens, hooks)
            for hook in hooks:
                spliced &= norms[hook].inliers(clean[hook])
            # next-token predictions made from spliced positions (the last position predicts nothing)
            scored = spliced[:, :-1]
            targets = tokens[:, 1:][scored]
            logp = {}
            for key in ("clean", "sae", "zero"):
                logp[key] = torch.log_softmax(logits(tokens, key, spliced)[:, :-1][scored].float(), dim=-1)
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
