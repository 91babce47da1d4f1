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
    sae = build_sae(cfg["sae"])
    try:
        sae.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors' own error type, or a RuntimeError for mismatched tensors
        raise SaepipeError(
            f"{weights} cannot be loaded ({first_line(e)}): the run folder is damaged; "
            f"train it again (saepipe train ... --overwrite)"
        ) from None
    return sae.to(device).eval(), cfg
