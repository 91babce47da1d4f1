"""Refuse a run that cannot fit before anything is allocated: a --width typed with three zeros too many
would otherwise end in an allocator's traceback (or the kernel's OOM killer) after the store was read.
The estimate is a floor, not a forecast: what training surely holds at once."""

from __future__ import annotations

import os

import torch

from stages.basics.errors import SaepipeError
from stages.saes import new_sae

# float32 weights, their gradients and Adam's two moments
BYTES_PER_PARAMETER = 4 * 4


def training_bytes(arch: str, activation: str, d_in: int, width: int, settings, batch_size: int, **shape) -> int:
    """At least what training one SAE holds: its parameters four times over, and one batch of dense
    pre-activations (every architecture computes x W_enc for the whole batch)."""
    with torch.device("meta"):  # sizes only: nothing is allocated
        sae = new_sae(arch, activation, d_in, width, settings, **shape)
    parameters = sum(p.numel() for p in sae.parameters())
    return parameters * BYTES_PER_PARAMETER + batch_size * sae.d_sae * 4


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    return None


def require_room(needs: list[tuple[str, int]], device: torch.device) -> None:
    """needs: (run name, bytes) of every SAE trained at once. Refused in one line when their sum is more
    than the device has free."""
    free = available_bytes(device)
    total = sum(n for _, n in needs)
    if free is None or total <= free:
        return
    what = needs[0][0] if len(needs) == 1 else f"the sweep's {len(needs)} runs, trained at once,"
    raise SaepipeError(
        f"{what} {'needs' if len(needs) == 1 else 'need'} at least {_gb(total)} for the SAE's weights, gradients, optimizer state and one batch of "
        f"pre-activations, more than the {_gb(free)} free on {device}: lower --width (or --batch-size)"
        + (", or train the sweep's runs one at a time" if len(needs) > 1 else "")
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"
