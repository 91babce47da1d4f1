"""Export a trained SAE as a SAELens 6.x directory (``cfg.json`` + ``sae_weights.safetensors``).

Our SAEs act on *normalized* activations ``x̂`` (see ``store_schema.normalization``); a SAELens SAE is
handed the model's *raw* activations ``x``. The export therefore moves our normalization into the
exported weights or, where that is impossible, onto a SAELens run-time normalization. Nothing here
imports ``sae_lens``: the format is written from its documented layout, and the tests load it back with
``sae_lens.SAE.load_from_disk``.

The SAELens 6.x format written
------------------------------
``cfg.json`` holds the fields of SAELens's ``SAEConfig`` (``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``), ``architecture``, the
architecture's own fields (TopK: ``k``, ``rescale_acts_by_decoder_norm``) and a ``metadata`` object
(``model_name``, ``hook_name``, ``context_size``, ``dataset_path``, ``prepend_bos``, …, plus
``sae_lens_version`` >= 6, without which SAELens would treat the file as a pre-6.0 config, and a
``saepipe`` entry recording where the SAE came from). ``sae_weights.safetensors`` holds float32
``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] and any extra
tensors of the architecture. SAELens computes, with ``apply_b_dec_to_input`` true, exactly our
``pre = (x − b_dec) W_enc + b_enc`` and ``x_rec = f(pre) W_dec + b_dec``.

Each architecture says how it appears in SAELens through ``sae.saelens_export()`` (an ``ArchExport``:
the SAELens architecture name, its extra cfg fields and extra tensors). Extra tensors must live in pre-activation
space (e.g. a JumpReLU ``threshold``): the normalization folds below leave pre-activations unchanged,
so such tensors are exported as they are. ``topk`` maps to SAELens ``topk`` with ``k = sae.k`` and
``rescale_acts_by_decoder_norm = false``: SAELens's TopK then takes the top k pre-activations, ReLUs
them and zeroes the rest, with no decoder-norm rescaling, which is exactly our TopK (the folded
decoder rows are no longer unit-norm, so the rescaling must stay off).

Normalization modes
-------------------
- ``none``: the weights as they are; ``normalize_activations: "none"``. Exact.
- ``center-scale`` (``x̂ = (x − μ)·c``): folded into the weights, ``normalize_activations: "none"``:
  ``W_enc' = c·W_enc``, ``W_dec' = W_dec / c``, ``b_dec' = μ + b_dec / c``, ``b_enc' = b_enc``. Then
  ``(x − b_dec') W_enc' = ((x − μ)·c − b_dec) W_enc``, so pre-activations, latent codes and any
  thresholds are unchanged, and the decoder returns ``x̂_rec / c + μ``, our inverse. Exact up to float32
  rounding (the fold is computed in float64; measured agreement ≤ 3e-7 relative).
- ``token`` (per row ``x̂ = (x − m) / s``, ``m`` the row mean, ``s = ‖x − m‖/√d + 1e-6``): a per-row
  map cannot be folded into fixed weights. SAELens's closest mode is ``"layer_norm"``, which per row
  computes ``x̃ = (x − m) / (σ_u + 1e-5)`` with ``σ_u = torch.std`` — the *unbiased* (``d − 1``)
  standard deviation, ``σ_u = √(d/(d−1)) · ‖x − m‖/√d`` — and on the way out ``x = x̃_rec · σ_u + m``
  (no eps). So ``x̂ ≈ α·x̃`` with the constant ``α = √(d/(d−1))``, which is folded like center-scale
  with ``μ = 0``, ``c = α``. What is left is the eps: with ``σ = ‖x − m‖/√d`` (our per-row scale), the
  exported encoder sees ``(x − m)/(σ + 1e-5/α)`` where ours sees ``(x − m)/(σ + 1e-6)``, and the decoder
  multiplies by ``σ`` instead of ``σ + 1e-6``: a relative error of about ``1e-5/σ`` per row on codes and on
  reconstructions (measured over σ from 1e-3 to 10: at most 1.06e-5/σ on codes and 1.03e-5/σ on the
  reconstruction's deviation from its row mean; 6e-6 at σ ≈ 2, 2.5e-4 at σ ≈ 0.05). Residual-stream
  rows have σ far above 1e-2, so the export agrees to better than 1e-3. Near-constant rows (σ ≲ 1e-2)
  agree less well, and a row whose k-th and (k+1)-th pre-activations are within that relative margin
  can pick a different latent (measured: no row at σ ≥ 0.1, 0.2% of rows at σ = 0.01, 2% at 1e-3).
  This was judged close enough to export rather than refuse; the config records
  ``normalize_activations: "layer_norm"``. SAELens's ``layer_norm`` keeps each row's (m, σ_u) from
  ``encode`` for the next ``decode``, so ``decode`` must follow ``encode`` on the same batch.

The export is written to a temporary sibling directory and renamed into place; an existing export at
``out_dir`` (a directory holding ``cfg.json``, or an empty one) is replaced, anything else is refused.
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
from safetensors.torch import save_file

from stages import __version__
from stages.saes.base import SparseAutoencoder
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
        mean = torch.as_tensor(norm.mean, dtype=torch.float32).reshape(-1)
        if mean.shape[0] != d_in:
            raise ValueError(f"normalization mean has width {mean.shape[0]}, the SAE's d_in is {d_in}")
        scale = float(torch.tensor(norm.scale, dtype=torch.float32))  # the float32 c the data was scaled by
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"center-scale normalization has an unusable scale {norm.scale!r}")
        return _fold_affine(weights, mean, scale)
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


def _saelens_version() -> str:
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
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"cannot export an SAE with non-finite weights ({', '.join(bad)})")

    metadata: dict[str, Any] = {
        "sae_lens_version": _saelens_version(),
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
        "saepipe": {
            "version": __version__,
            "sae_config": sae.config(),
            "normalization": {
                **norm.to_attrs(),
                "exported_as": normalize_activations,
                "folded_into_weights": norm.mode != "none",
            },
        },
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

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        save_file(tensors, str(tmp / SAE_WEIGHTS_FILENAME))
        with open(tmp / SAE_CFG_FILENAME, "w") as f:
            json.dump(cfg, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
