"""Export a trained SAE as a SAELens 6.x folder (``cfg.json`` + ``sae_weights.safetensors``) that acts on the
model's raw activations: the store's normalization is folded into the weights, or for ``token`` mode put
onto SAELens's ``layer_norm``. The format, the folds and their accuracy: docs/saelens-export.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from stages import __version__
from stages.basics import run_dir
from stages.saes.base import SparseAutoencoder, nonfinite_tensors
from store_schema.normalization import Normalization

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
# The SAELens release whose format this module writes; recorded as `sae_lens_version` when sae-lens is not
# installed (SAELens reads configs without a version >= 6.0 as the old pre-6.0 format).
SAELENS_FORMAT_VERSION = "6.0.0"


# -- folding the normalization --------------------------------------------------------------------


def _check_weights(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    missing = [k for k in WEIGHT_KEYS if k not in weights]
    if missing:
        raise ValueError(f"SAE weights lack {', '.join(missing)}")
    d_in, d_sae = weights["W_enc"].shape
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"SAE weight {key} has shape {tuple(weights[key].shape)}, expected {shape}")
    return d_in, d_sae


def _fold_affine(weights: dict[str, torch.Tensor], mean: torch.Tensor | None, c: float) -> dict[str, torch.Tensor]:
    """Weights acting on x for an SAE that acts on x̂ = (x − mean)·c (float64 arithmetic, float32 out)."""
    w = {k: weights[k].detach().to("cpu", torch.float64) for k in WEIGHT_KEYS}
    b_dec = w["b_dec"] / c
    if mean is not None:
        b_dec = b_dec + mean.to("cpu", torch.float64)
    folded = {"W_enc": w["W_enc"] * c, "b_enc": w["b_enc"], "W_dec": w["W_dec"] / c, "b_dec": b_dec}
    return {k: v.to(torch.float32).contiguous() for k, v in folded.items()}


def center_scale(norm: Normalization, width: int) -> tuple[torch.Tensor, float]:
    """(μ as float32 [width], c as the float32 value the data was scaled by) of a center-scale
    normalization x̂ = (x − μ)·c, checked: a mean of another width or an unusable scale is a ValueError."""
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).reshape(-1)
    if mean.shape[0] != width:
        raise ValueError(f"normalization mean has width {mean.shape[0]}, the SAE's is {width}")
    scale = float(torch.tensor(norm.scale, dtype=torch.float32))  # the float32 c the data was scaled by
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"center-scale normalization has an unusable scale {norm.scale!r}")
    return mean, scale


def fold_normalization(weights: dict[str, torch.Tensor], norm: Normalization) -> dict[str, torch.Tensor]:
    """Our SAE's weights (acting on normalized x̂) -> weights acting on raw activations x.

    ``none``: copies as float32. ``center-scale``: W_enc·c, b_enc, W_dec/c, μ + b_dec/c (exact up to
    float32 rounding). ``token`` has no raw-space equivalent and raises ValueError (export_saelens maps
    it onto SAELens's ``layer_norm`` instead; see the module docstring).
    """
    d_in, _ = _check_weights(weights)
    if norm.mode == "none":
        return {k: weights[k].detach().to("cpu", torch.float32).clone().contiguous() for k in WEIGHT_KEYS}
    if norm.mode == "center-scale":
        return _fold_affine(weights, *center_scale(norm, d_in))
    raise ValueError(
        f"{norm.mode!r} normalization is per-row and cannot be folded into raw-space weights; "
        "export_saelens maps it onto SAELens's 'layer_norm' normalization instead"
    )


def input_scale(norm: Normalization, d_in: int) -> float:
    """c such that the exported SAE's input, after b_dec, is ours divided by c: the center-scale factor,
    √(d/(d−1)) for ``token`` (see to_saelens_space), 1 for ``none``."""
    if norm.mode == "center-scale":
        return float(torch.tensor(norm.scale, dtype=torch.float32))
    if norm.mode == "token":
        return math.sqrt(d_in / (d_in - 1))
    return 1.0


def to_saelens_space(weights: dict[str, torch.Tensor], norm: Normalization) -> tuple[dict[str, torch.Tensor], str]:
    """The weights SAELens should hold and its ``normalize_activations`` mode that goes with them."""
    if norm.mode != "token":
        return fold_normalization(weights, norm), "none"
    d_in, _ = _check_weights(weights)
    if d_in < 2:
        raise ValueError(
            "token-normalized SAEs need d_in >= 2 to be exported (SAELens's layer_norm divides by "
            "the unbiased standard deviation)"
        )
    # SAELens's layer_norm output x̃ = (x − m)/σ_u and our x̂ = (x − m)/σ_b differ by σ_u/σ_b = √(d/(d−1)).
    return _fold_affine(weights, None, math.sqrt(d_in / (d_in - 1))), "layer_norm"


# -- writing ----------------------------------------------------------------------------------------


def _saelens_version_to_record() -> str:
    try:
        version = importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return SAELENS_FORMAT_VERSION
    major = version.split(".")[0]
    return version if major.isdigit() and int(major) >= 6 else SAELENS_FORMAT_VERSION


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`, replacing an earlier export there."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    if (
        not out_dir.is_dir()
        or out_dir.is_symlink()
        or (any(out_dir.iterdir()) and not (out_dir / SAE_CFG_FILENAME).is_file())
    ):
        raise ValueError(f"{out_dir} exists and is not a SAELens export directory; refusing to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "export")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / "export", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def export_saelens(
    out_dir: str | Path,
    sae: SparseAutoencoder,
    norm: Normalization,
    *,
    hook_name: str,
    model_name: str,
    context_size: int,
    dataset: str,
    extra_metadata: dict | None = None,
) -> Path:
    """Write `sae` (trained on `norm`-normalized activations) as a SAELens 6.x SAE acting on raw activations.

    Produces out_dir/cfg.json and out_dir/sae_weights.safetensors, loadable with
    ``sae_lens.SAE.load_from_disk(out_dir)``. `extra_metadata` entries are added to (and may override)
    the cfg's ``metadata``. Returns out_dir.
    """
    arch = sae.saelens_export()
    raw = {k: getattr(sae, k).detach().to("cpu", torch.float32) for k in WEIGHT_KEYS}
    weights, normalize_activations = to_saelens_space(raw, norm)
    if arch.tied:
        # One dictionary (SAELens: W_enc = W_decᵀ). Dividing the input by c cannot be folded into a tied
        # W_dec (the pursuit needs its unit rows), so W_dec stays as it is and only b_dec is folded: SAELens's
        # codes are ours divided by c, its reconstructions equal ours.
        weights = {"W_dec": raw["W_dec"].contiguous(), "b_dec": weights["b_dec"]}
    scale = input_scale(norm, sae.d_in)
    arch_cfg = {key: value / scale if key in arch.input_units else value for key, value in arch.cfg.items()}
    tensors = {**weights, **{k: v.detach().to("cpu", torch.float32).contiguous() for k, v in arch.tensors.items()}}
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"cannot export an SAE with non-finite weights ({', '.join(bad)})")

    metadata: dict[str, Any] = base_metadata(sae, model_name, hook_name, context_size, dataset)
    metadata["saepipe"]["normalization"] = {
        **norm.to_attrs(),
        "exported_as": normalize_activations,
        "folded_into_weights": norm.mode != "none",
    }
    metadata.update(extra_metadata or {})
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize_activations,
        # SAELens flattens [..., n_heads, d_head] inputs of attention hook_z SAEs (its own convention).
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
        "architecture": arch.architecture,
        **arch_cfg,
        "metadata": metadata,
    }
    return write_saelens_folder(out_dir, tensors, cfg)


def base_metadata(sae: SparseAutoencoder, model_name: str, hook_name: str, context_size: int, dataset: str) -> dict:
    """The cfg.json `metadata` every export of ours carries (SAELens's keys, and ours under "saepipe")."""
    return {
        "sae_lens_version": _saelens_version_to_record(),
        "sae_lens_training_version": None,  # trained by saepipe, not SAELens
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": int(context_size),
        "prepend_bos": True,  # saepipe's contexts start with BOS at position 0
        "dataset_path": dataset,
        "exclude_special_tokens": False,
        "seqpos_slice": [None],
        "model_from_pretrained_kwargs": {},
        "neuronpedia_id": None,
        "saepipe": {"version": __version__, "sae_config": sae.config()},
    }


def write_saelens_folder(out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: dict) -> Path:
    """sae_weights.safetensors and cfg.json into out_dir, all or nothing (an earlier export is replaced)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        run_dir.save_tensors(tensors, tmp / SAE_WEIGHTS_FILENAME)
        with open(tmp / SAE_CFG_FILENAME, "w") as f:
            json.dump(cfg, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
