"""What `python -m benchmarks bench` and `python -m benchmarks scale` share: running named parts in turn into one JSON file that
keeps what was measured if a later part fails, and a table of each key against its target."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def run_parts(parts: dict[str, Callable[[], dict]], result: dict, out: Path, label: str, progress: bool) -> dict:
    """Run each part, merging the keys it returns into `result` and its seconds into result["seconds"];
    `out` (the JSON file) is rewritten after each part, so partial results survive a failure."""
    for name, part in parts.items():
        if progress:
            print(f"{label}: {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result |= part()
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(result, indent=2))
    return result


def targets_table(result: dict, targets: dict[str, tuple[str, float | None]], limits: dict[str, float]) -> str:
    """A markdown table of the measured keys against their targets; `limits` gives the targets known
    only once measured (a memory bound that depends on buffer sizes)."""
    lines = ["| key | value | target |", "| --- | ---: | --- |"]
    for key, (op, target) in targets.items():
        if key in result:
            wanted = "report" if op == "report" else f"{op} {limits.get(key, target):.4g}"
            lines.append(f"| {key} | {result[key]:.4g} | {wanted} |")
    return "\n".join(lines)


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each side once per round, in turn; each call returns a rate. The lists keep every round."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            rates[name].append(side())
    return rates


def ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median rate of side `top` over that of side `bottom`."""
    return statistics.median(rates[top]) / statistics.median(rates[bottom])
