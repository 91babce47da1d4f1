"""Export a trained transcoder as a SAELens 6.x transcoder folder acting on the model's raw activations:
``transcoder``/``skip_transcoder`` (ReLU) and ``jumprelu_transcoder``/``jumprelu_skip_transcoder``
(JumpReLU, and BatchTopK's learned threshold). SAELens has no TopK transcoder, so a TopK one is not
exported. The input and output hooks' normalizations are folded into the weights (center-scale or none;
a per-token normalized input has no raw-space equivalent).

With x̂ = (x − μ_in)·c_in and y = ŷ / c_out + μ_out:
    W_enc' = c_in W_enc,  b_enc' = b_enc − c_in μ_in W_enc,  W_dec' = W_dec / c_out,
    W_skip' = (c_in / c_out) W_skip,  b_dec' = b_dec / c_out + μ_out − (c_in / c_out) μ_in W_skip.
SAELens stores W_skip as [d_out, d_in].

Format and checks: docs/saelens-export.md#transcoders
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.saes.base import SparseAutoencoder, nonfinite_tensors
from stages.train.saelens_export import base_metadata, center_scale, write_saelens_folder
from store_schema.normalization import Normalization

# Our activation's SAELens export name -> SAELens's transcoder architecture (plain, skip)
SAELENS_TRANSCODERS = {
    "standard": ("transcoder", "skip_transcoder"),
    "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
}


def affine(norm: Normalization, width: int) -> tuple[torch.Tensor, float]:
    """(μ, c) of a normalization x̂ = (x − μ)·c, μ in float64 (`none`: μ = 0, c = 1)."""
    if norm.mode == "none":
        return torch.zeros(width, dtype=torch.float64), 1.0
    if norm.mode == "center-scale":
        mean, scale = center_scale(norm, width)
        return mean.double(), scale
    raise ValueError(f"a transcoder of a {norm.mode!r}-normalized hook cannot be folded into raw-space weights")


def fold_encoder(W_enc: torch.Tensor, b_enc: torch.Tensor, in_norm: Normalization):  # noqa: N803
    """An encoder (x̂ W_enc + b_enc, no b_dec subtracted) of normalized rows x̂ = (x − μ)·c as one of raw rows:
    (c W_enc, b_enc − c μ W_enc), in float64."""
    mu, c = affine(in_norm, W_enc.shape[0])
    W_enc, b_enc = W_enc.double(), b_enc.double()  # noqa: N806
    return c * W_enc, b_enc - c * (mu @ W_enc)


def fold_transcoder(sae: SparseAutoencoder, in_norm: Normalization, out_norm: Normalization) -> dict[str, torch.Tensor]:
    """The transcoder's weights acting on raw x and writing raw y (float64 arithmetic, float32 out)."""
    w = {k: v.detach().to("cpu", torch.float64) for k, v in sae.state_dict().items() if k.startswith(("W_", "b_"))}
    mu_in, c_in = affine(in_norm, sae.d_in)
    mu_out, c_out = affine(out_norm, sae.d_out)
    W_enc, b_enc = fold_encoder(w["W_enc"], w["b_enc"], in_norm)  # noqa: N806
    folded = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": w["W_dec"] / c_out,
        "b_dec": w["b_dec"] / c_out + mu_out,
    }
    if "W_skip" in w:
        skip = (c_in / c_out) * w["W_skip"]
        folded["W_skip"] = skip.t()  # SAELens: [d_out, d_in]
        folded["b_dec"] = folded["b_dec"] - mu_in @ skip
    return {k: v.to(torch.float32).contiguous() for k, v in folded.items()}


def export_saelens_transcoder(
    out_dir: str | Path,
    sae: SparseAutoencoder,
    in_norm: Normalization,
    out_norm: Normalization,
    *,
    in_hook: str,
    out_hook: str,
    model_name: str,
    context_size: int,
    dataset: str,
    extra_metadata: dict | None = None,
) -> Path:
    """Write the transcoder `sae` (trained on normalized hooks) as a SAELens transcoder on raw activations.
    Raises ValueError for what SAELens cannot hold (a TopK transcoder; a per-token normalized input)."""
    arch = sae.saelens_export_of_activation()
    if arch.architecture not in SAELENS_TRANSCODERS:
        raise ValueError(
            f"SAELens has no transcoder of {sae.activation!r} activations (it has ReLU and JumpReLU ones): "
            f"the run folder keeps the weights"
        )
    tensors = fold_transcoder(sae, in_norm, out_norm)
    tensors |= {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in arch.tensors.items()}
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"cannot export a transcoder with non-finite weights ({', '.join(bad)})")
    metadata = base_metadata(sae, model_name, in_hook, context_size, dataset)
    metadata["hook_name_out"] = out_hook  # SAELens keeps only the input hook among its own keys
    metadata["saepipe"] |= {
        "out_hook": out_hook,
        "normalization": {"in": in_norm.to_attrs(), "out": out_norm.to_attrs(), "folded_into_weights": True},
    }
    metadata.update(extra_metadata or {})
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "d_out": sae.d_out,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # SAELens's transcoders refuse it: b_dec is an output bias
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if in_hook.endswith("hook_z") else "none",
        "architecture": SAELENS_TRANSCODERS[arch.architecture][bool(sae.skip)],
        "metadata": metadata,
    }
    return write_saelens_folder(out_dir, tensors, cfg)
