"""A trained SAE read back from its run folder (the weights and the config that rebuilds the module)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from stages.basics import run_dir
from stages.basics.errors import SaepipeError, first_line
from stages.saes import build_sae


def load_sae(run: Path, device: torch.device | str = "cpu"):
    """(SAE module, cfg dict) of a finished run."""
    weights = Path(run) / run_dir.SAE_WEIGHTS
    if not weights.exists() and (Path(run) / run_dir.SAELENS_WEIGHTS).exists():
        raise SaepipeError(
            f"{run} is a SAELens SAE folder (a run's saelens/ export, or SAELens's own), not a saepipe run: "
            f"evaluate it with `saepipe eval OUT --external {run} --store STORE`, or pass the run folder above it"
        )
    cfg = run_dir.load_config(run)
    if not weights.exists():
        raise SaepipeError(
            f"{run} has a {run_dir.CONFIG} but no {run_dir.SAE_WEIGHTS}: the run did not finish; "
            f"resume it with `saepipe train ... --resume`"
        )
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors' own error type
        raise SaepipeError(
            f"{weights} cannot be loaded ({first_line(e)}): the run folder is damaged; "
            f"train it again (saepipe train ... --overwrite)"
        ) from None
    _check_sae_record(cfg.get("sae"), tensors, run)
    try:
        sae = build_sae(cfg["sae"])
        sae.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: tensors of other shapes
        raise SaepipeError(
            f"{run}/{run_dir.CONFIG} does not describe the weights in {weights} ({type(e).__name__}: "
            f"{first_line(e)}): the run folder is damaged; train it again (saepipe train ... --overwrite)"
        ) from None
    return sae.to(device).eval(), cfg


def _check_sae_record(record, tensors: dict[str, torch.Tensor], run: Path) -> None:
    """cfg.json's `sae` record, checked before anything is built from it: its sizes must be whole numbers
    that no more than the weights' own elements, so an edited cfg.json cannot make us allocate gigabytes
    (or fail deep inside a module) before the weights are found not to fit."""
    problem = None
    if not isinstance(record, dict) or not isinstance(record.get("arch"), str):
        problem = "its 'sae' record names no architecture"
    else:
        available = sum(t.numel() for t in tensors.values())
        for key in ("d_in", "d_sae", "k"):
            value = record.get(key)
            if value is None and key == "k":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problem = f"sae.{key} is {value!r}, not a positive whole number"
                break
        else:
            if record["d_in"] * record["d_sae"] > 4 * available:
                problem = (
                    f"sae.d_in x sae.d_sae is {record['d_in'] * record['d_sae']:,}, more than the weights hold "
                    f"({available:,} values)"
                )
    if problem is not None:
        raise SaepipeError(
            f"{run}/{run_dir.CONFIG} is damaged ({problem}): train the run again (saepipe train ... --overwrite)"
        )
