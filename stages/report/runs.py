"""What report and compare read from a run folder: eval.json, the training log, the firing fractions.

Nothing here loads the SAE or torch, so `saepipe compare` stays quick.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.basics.eval_record import read_eval


@dataclass
class EvaluatedRun:
    path: Path
    label: str  # unique among the runs of one report: the folder name, with its parent when names collide
    eval: dict
    log: list[dict]  # training-log lines; empty for an SAE evaluated from elsewhere
    density: np.ndarray | None  # float64 [d_sae]: fraction of eval tokens each latent fired on

    @property
    def sae_config(self) -> dict:
        return self.eval.get("sae") or {}

    @property
    def slug(self) -> str:
        """The label as a file name."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label).strip("_") or "run"


def require_eval(path: Path) -> Path:
    run_dir.require_not_sweep(path)
    eval_path = path / run_dir.EVAL
    if not eval_path.is_file():
        raise SaepipeError(f"{path} has no eval.json: run `saepipe eval {path}` first")
    return eval_path


def read_density(path: Path, d_sae: int | None) -> np.ndarray | None:
    file = path / run_dir.FEATURE_DENSITY
    if not file.is_file():
        return None
    try:
        density = np.load(file)  # never a pickle: np.load refuses object arrays
    except (ValueError, OSError, EOFError):
        raise SaepipeError(
            f"{file} is damaged (not a NumPy array of firing fractions): evaluate the run again (saepipe eval {path})"
        ) from None
    if density.dtype.kind not in "fiu" or not np.all((density >= 0) & (density <= 1)):
        raise SaepipeError(
            f"{file} is damaged (firing fractions outside 0 to 1, or not numbers): evaluate the run again "
            f"(saepipe eval {path})"
        )
    if d_sae is not None and density.shape != (d_sae,):
        print(
            f"warning: {file} holds {density.shape} values for an SAE of {d_sae} latents; ignoring it", file=sys.stderr
        )
        return None
    return density.astype(np.float64)


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names; where two runs share one, prefix parent folders until they differ."""
    labels = [p.name or str(p) for p in paths]
    for depth in range(2, 6):
        clashes = {label for label in labels if labels.count(label) > 1}
        if not clashes:
            return labels
        labels = ["/".join(p.parts[-depth:]) if label in clashes else label for p, label in zip(paths, labels)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:  # the same folder given twice
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def load_runs(paths: list[str | Path]) -> list[EvaluatedRun]:
    """Every run, or a SaepipeError naming the first that was not evaluated (checked before any work)."""
    if not paths:
        raise SaepipeError("name at least one run folder")
    resolved = [Path(p) for p in paths]
    for path in resolved:
        if not path.is_dir():
            raise SaepipeError(f"{path} is not a run folder: pass folders that `saepipe train` wrote")
        require_eval(path)
    runs = []
    for path, label in zip(resolved, unique_labels([p.resolve() for p in resolved])):
        metrics = read_eval(path / run_dir.EVAL, f"evaluate the run again (saepipe eval {path})")
        d_sae = (metrics.get("sae") or {}).get("d_sae")
        runs.append(EvaluatedRun(path, label, metrics, run_dir.read_log(path), read_density(path, d_sae)))
    return runs
