"""What an SAE reads and writes: the one description the training loop takes of every architecture.

Each architecture class answers three questions from how a run names its hooks (`HookArgs`), so that the
loop never asks which architecture it is training:
- `hook_io(args)`: the store's hooks it encodes and those it reconstructs (`HookIO`);
- `shape_for(io, width)`: its input width and the other sizes it is built with, from the hooks' widths;
- `hook_record(io, width, normalization)`: what cfg.json records of those hooks, beside `hook`;
- `recorded_io(record)`: the same hooks, and each hook's normalization record, read back from cfg.json;
- `widths_at(io)` (of a built SAE): the width of each hook it reads and writes.
An SAE and a crosscoder reconstruct what they read; a transcoder and a cross-layer transcoder write other
hooks (`HookIO.transcodes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class HookArgs:
    """How a run names its hooks: train's --hook (repeated for a crosscoder), --in-hook/--out-hook (a
    transcoder), --layers (a cross-layer transcoder, as a range of layers)."""

    hook: str | None = None
    hooks: tuple[str, ...] = ()
    in_hook: str | None = None
    out_hook: str | None = None
    layers: range | None = None


@dataclass(frozen=True)
class HookIO:
    """The store hooks an SAE encodes (`reads`) and reconstructs (`writes`), in order; row i of each is
    the same token."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @property
    def transcodes(self) -> bool:
        """Whether it writes other hooks than it reads."""
        return self.writes != self.reads

    @property
    def batch_hooks(self) -> tuple[str, ...]:
        """The hooks a training batch holds, side by side: those read, then those written when they are
        others."""
        return self.reads + self.writes if self.transcodes else self.reads

    @property
    def single(self) -> bool:
        """Whether it reads one hook and writes one (an SAE, a transcoder), not several (a crosscoder, a
        CLT): what measures that splice one hook into the model, or probe one, can take."""
        return len(self.reads) == 1 and len(self.writes) == 1


def several_hooks_record(io: HookIO, normalization: Callable[[str], dict]) -> dict:
    """What cfg.json records of a run over several hooks at once (a crosscoder, a CLT): every hook read
    and written, each with its own normalization."""
    return {
        "in_hooks": list(io.reads),
        "out_hooks": list(io.writes),
        "normalizations": {hook: normalization(hook) for hook in io.batch_hooks},
    }


def several_hooks_from_record(record: dict) -> tuple[HookIO, dict[str, dict]]:
    """The hooks and normalization records that several_hooks_record wrote."""
    return HookIO(tuple(record["in_hooks"]), tuple(record["out_hooks"])), record["normalizations"]
