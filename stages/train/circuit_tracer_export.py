"""Export for circuit-tracer (PyPI `circuit-tracer`, 0.5.0), which computes attribution graphs from
transcoders: a set of per-layer transcoders (one run per layer, every layer of the model) or one
cross-layer transcoder, written in the files its loaders read, acting on the model's raw activations
(each hook's normalization folded into the weights, as for the SAELens export).

Per-layer set (`model_kind: transcoder_set`): layer_{L}.safetensors with exactly W_enc [d_sae, d_in],
W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], and W_skip [d_out, d_in] (a skip transcoder) and
activation_function.threshold [d_sae] (JumpReLU) when they apply.
CLT (`model_kind: cross_layer_transcoder`): W_enc_{l}.safetensors with W_enc_{l} [width, d_in], b_enc_{l},
b_dec_{l} (layer l's output bias) and threshold_{l}; W_dec_{l}.safetensors with W_dec_{l}
[width, L − l, d_out] (slice j writes into layer l + j).

circuit-tracer computes pre = x W_encᵀ + b_enc with no b_dec subtracted (as ours), then ReLU, or JumpReLU
when a threshold is given. It has no TopK: TopK runs are refused (BatchTopK exports as JumpReLU with its
learned threshold, what it computes at inference).

Format, checks and the offline attribution run: docs/circuit-tracer.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.saes.base import nonfinite_tensors
from stages.train.transcoder_export import affine, fold_encoder, fold_transcoder
from store_schema.normalization import Normalization

CONFIG = "config.yaml"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"  # circuit-tracer's names, relative to blocks.L
EXPORTED_ACTIVATIONS = ("relu", "jumprelu", "batchtopk")  # what its files hold: ReLU, or JumpReLU


def _layer_of(hook: str, suffix: str) -> int | None:
    match = re.fullmatch(rf"blocks\.(\d+)\.{re.escape(suffix)}", hook)
    return None if match is None else int(match.group(1))


def threshold_of(sae) -> torch.Tensor | None:
    """The JumpReLU threshold an activation exports with, [d_sae] (a CLT's: [n_layers]); None for ReLU. TopK
    cannot be exported."""
    if sae.activation not in EXPORTED_ACTIVATIONS:
        raise SaepipeError(
            f"circuit-tracer's files hold ReLU and JumpReLU transcoders, not {sae.activation}: train with "
            f"--activation relu, jumprelu or batchtopk (exported as JumpReLU with its learned threshold)"
        )
    if sae.activation == "relu":
        return None
    if sae.n_layers:  # a CLT: one threshold per layer [n_layers]
        return sae.threshold.detach().float()
    return sae.saelens_export_of_activation().tensors["threshold"].detach().float().reshape(-1)


def export_transcoder_set(layers: dict[int, tuple], out: Path, n_layers: int, model_name: str) -> Path:
    """`layers`: {layer: (transcoder, in normalization, out normalization)}, every layer 0 .. n_layers − 1."""
    missing = sorted(set(range(n_layers)) - set(layers))
    if missing:
        raise SaepipeError(
            f"circuit-tracer needs a transcoder for every layer 0-{n_layers - 1} of {model_name}; missing "
            f"layers {', '.join(map(str, missing))}"
        )
    widths = {sae.d_sae for sae, _, _ in layers.values()}
    if len(widths) > 1:
        raise SaepipeError(f"circuit-tracer needs one width for every layer; these runs have {sorted(widths)}")
    files = {}
    for layer, (sae, in_norm, out_norm) in sorted(layers.items()):
        folded = fold_transcoder(sae, in_norm, out_norm)
        tensors = {
            "W_enc": folded["W_enc"].t(),  # ours [d_in, d_sae]; circuit-tracer's [d_sae, d_in]
            "W_dec": folded["W_dec"],
            "b_enc": folded["b_enc"],
            "b_dec": folded["b_dec"],
        }
        if "W_skip" in folded:
            tensors["W_skip"] = folded["W_skip"]  # [d_out, d_in], as both SAELens and circuit-tracer keep it
        threshold = threshold_of(sae)
        if threshold is not None:
            tensors["activation_function.threshold"] = threshold.expand(sae.d_sae)
        files[f"layer_{layer}.safetensors"] = tensors
    return _write(out, files, "transcoder_set", model_name)


def export_clt(clt, norms: dict[str, Normalization], in_hooks, out_hooks, out: Path, model_name: str) -> Path:
    """A CLT covering every layer of the model (circuit-tracer's CLT has no layer offset)."""
    threshold = threshold_of(clt)
    files = {}
    for layer, in_hook in enumerate(in_hooks):
        encoder, decoder = _folded_clt_layer(clt, layer, norms[in_hook], [norms[h] for h in out_hooks[layer:]])
        if threshold is not None:
            encoder["threshold"] = threshold[layer].expand(clt.width)
        files[f"W_enc_{layer}.safetensors"] = {f"{k}_{layer}": v for k, v in encoder.items()}
        files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": decoder}
    return _write(out, files, "cross_layer_transcoder", model_name)


def _folded_clt_layer(clt, layer: int, in_norm: Normalization, out_norms: list[Normalization]):
    """Layer `layer`'s encoder (with its output bias) and its decoder [width, L − layer, d_out] on raw rows."""
    W_enc, b_enc = fold_encoder(clt.W_enc[layer].detach(), clt.b_enc[layer].detach(), in_norm)  # noqa: N806
    # each block of the writes into layer m is divided by layer m's scale; the bias is this layer's output's
    scales = torch.tensor([affine(norm, clt.d_out)[1] for norm in out_norms], dtype=torch.float64)
    W_dec = clt.writes_of(layer).detach().double() / scales[None, :, None]  # noqa: N806 - [width, L − layer, d_out]
    mu_out, c_out = affine(out_norms[0], clt.d_out)
    b_dec = clt.b_dec[layer * clt.d_out : (layer + 1) * clt.d_out].detach().double() / c_out + mu_out
    encoder = {"W_enc": W_enc.t(), "b_enc": b_enc, "b_dec": b_dec}
    return {k: v.float().contiguous() for k, v in encoder.items()}, W_dec.float().contiguous()


def _write(out: Path, files: dict[str, dict[str, torch.Tensor]], kind: str, model_name: str) -> Path:
    """The files, then config.yaml last (a folder without it is not a circuit-tracer folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        bad = nonfinite_tensors(tensors)
        if bad:
            raise SaepipeError(f"cannot export non-finite weights ({', '.join(bad)}) for circuit-tracer")
        tmp = out / (name + ".tmp")
        run_dir.save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp)
        tmp.replace(out / name)
    config = {
        "model_kind": kind,
        "model_name": model_name,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "scan": f"saepipe/{model_name}",
    }
    # JSON strings are YAML scalars: no YAML writer needed for these few keys
    (out / CONFIG).write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    return out
