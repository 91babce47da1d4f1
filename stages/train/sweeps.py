"""Hyper-parameter sweeps: `--sweep k=16,32 --sweep lr=1e-4,4e-4` becomes one TrainConfig per
combination, all trained from one pass over the store (stages.train.run_sweep)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.saes import arch_settings
from stages.train.config import TrainConfig

# Every SAE of a sweep sees the same batches from the same store, so these cannot differ between them.
SHARED = (
    "store",
    "hook",
    "in_hook",
    "out_hook",
    "hooks",
    "layers",
    "batch_size",
    "tokens",
    "device",
    "resident",
    "log_every",
    "checkpoint_every",
)
NOT_PARAMETERS = ("out", "overwrite", "resume", "progress", "arch_settings", "wandb", "wandb_run")


def sweepable() -> list[str]:
    return [name for name in _parameter_types() if name not in SHARED + NOT_PARAMETERS]


def _parameter_types() -> dict[str, str]:
    """Every training parameter's type, the architectures' settings where the config holds them."""
    types = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "arch_settings":
            types |= {name: str(f.type) for name, f in arch_settings().items()}
        types[field.name] = str(field.type)
    return types


def _convert(name: str, annotation: str, text: str):
    try:
        if "bool" in annotation:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if "tuple" in annotation:  # joined by '/': groups=512/4096,1024/4096 or adam_betas=0.9/0.99
            item = float if "tuple[float" in annotation else int
            return tuple(item(v) for v in text.split("/"))
        if "int" in annotation and "float" not in annotation:
            return int(text)
        if "float" in annotation:
            return float(text)
        return text
    except ValueError:
        raise SaepipeError(f"--sweep {name}: cannot read {text!r} as {annotation}") from None


def parse_axes(specs: list[str]) -> dict[str, list]:
    """["k=16,32", "lr=1e-4,4e-4"] -> {"k": [16, 32], "lr": [0.0001, 0.0004]} (typed like TrainConfig)."""
    fields = _parameter_types()
    axes: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values:
            raise SaepipeError(f"--sweep takes NAME=V1,V2,..., got {spec!r}")
        if name in SHARED:
            raise SaepipeError(
                f"--sweep {name}: every SAE of a sweep shares the store's batches, so {name} "
                f"cannot vary; run separate trainings instead"
            )
        if name not in fields or name in NOT_PARAMETERS:
            raise SaepipeError(f"--sweep {name}: not a training parameter; sweepable: {', '.join(sweepable())}")
        if name in axes:
            raise SaepipeError(f"--sweep {name} is given twice: list all its values in one --sweep")
        texts = [v.strip() for v in values.split(",")]
        if "" in texts:
            raise SaepipeError(f"--sweep {spec} has an empty value: give values separated by commas, e.g. {name}=16,32")
        axes[name] = [_convert(name, fields[name], text) for text in texts]
        repeated = sorted({_label(v) for v in axes[name] if axes[name].count(v) > 1})
        if repeated:
            raise SaepipeError(
                f"--sweep {spec} repeats {', '.join(repeated)}: each SAE of a sweep needs settings of its own; "
                f"give each value once"
            )
    return axes


def _label(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


def expand(base: TrainConfig, axes: dict[str, list]) -> list[TrainConfig]:
    """One config per combination, each writing to base.out/<name=value_...>; tracked, each in a wandb run
    of its own, named <--wandb-run>-<name=value_...> (the run folder's name when no name is given)."""
    cfgs = []
    for combo in itertools.product(*axes.values()):
        params = dict(zip(axes, combo))
        name = "_".join(f"{k}={_label(v)}" for k, v in params.items())
        wandb_run = f"{base.wandb_run}-{name}" if base.wandb_run else None
        cfgs.append(base.replaced(**params, out=str(Path(base.out) / name), wandb_run=wandb_run))
    return cfgs


def write_summary(sweep_dir: Path, axes: dict[str, list], outs: list[Path]) -> dict:
    """sweep.json: each run's parameters and final training-log line."""
    runs = []
    for out in outs:
        cfg = run_dir.load_config(out)
        log = run_dir.read_log(out)
        runs.append(
            {"run": out.name, "params": {k: cfg["training"][k] for k in axes}, "final": log[-1] if log else None}
        )
    summary = {
        "axes": {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in axes.items()},
        "runs": runs,
    }
    run_dir.write_json_atomic(sweep_dir / run_dir.SWEEP_SUMMARY, summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'run':<40}{'fve':>8}{'l0':>8}{'dead':>8}{'loss':>10}"]
    for r in summary["runs"]:
        f = r["final"] or {}
        lines.append(
            f"{r['run']:<40}{f.get('fve', float('nan')):>8.4f}{f.get('l0', float('nan')):>8.1f}"
            f"{f.get('dead_fraction', float('nan')):>8.3f}{f.get('loss', float('nan')):>10.4f}"
        )
    return "\n".join(lines)
