"""Choosing the torch device; kept apart from host_models so training never imports transformer_lens."""

from __future__ import annotations

import torch

from stages.basics.errors import SaepipeError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SaepipeError(f"--device {device!r} is not a torch device: use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SaepipeError(f"--device {device} asked for CUDA but this torch sees no GPU: use --device cpu or auto")
    return resolved
