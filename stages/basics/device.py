"""Choosing the torch device (kept apart from the host-model code, so training never imports transformer_lens)."""

from __future__ import annotations

import torch

from stages.basics.errors import SaepipeError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the named device. A GPU gets its index (the current
    one for a bare ``cuda``); an unusable device is a SaepipeError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SaepipeError(f"--device {device!r} is not a torch device: use auto, cpu or cuda") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise SaepipeError(f"--device {device} asked for CUDA but this torch sees no GPU: use --device cpu or auto")
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise SaepipeError(
            f"--device {device} names a GPU this machine does not have "
            f"({torch.cuda.device_count()} visible): use --device cuda:0 or auto"
        )
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): what a timing must do before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
