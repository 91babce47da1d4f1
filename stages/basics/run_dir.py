"""The run folder that training writes and eval/report read: names, saving, loading."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from stages.basics.errors import SaepipeError
from store_schema.durable import fsync_path, write_durably

SAE_WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoint.safetensors"  # tensors, and a JSON header: nothing in it runs code (train/checkpoint.py)
PICKLED_CHECKPOINT = "checkpoint.pt"  # what saepipe wrote before: a pickle, never loaded
EVAL = "eval.json"
FEATURE_DENSITY = "feature_density.npy"  # eval: each latent's firing fraction over the eval rows
EXTERNAL = "external.json"  # an eval folder of an SAE trained elsewhere: where it is, and the store
SAELENS = "saelens"
SAELENS_WEIGHTS = "sae_weights.safetensors"  # what marks a SAELens SAE folder (the export's, or SAELens's own)
WANDB = "wandb.json"  # the wandb run a tracked run logs to (--wandb): project, id, name, entity, last step sent
WANDB_FILES = "wandb"  # wandb's own files (an offline run's records, its logs): wandb names the folder


def refuse_inside_store(out: Path) -> None:
    """An --out folder must not lie inside an activation store: a store holds only its own files (verify
    names any other as damage), and replacing the store would delete what was written there."""
    for folder in (Path(out).absolute(), *Path(out).absolute().parents):
        try:
            root = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(root, dict) and "saepipe" in (root.get("attributes") or {}):
            raise SaepipeError(f"--out {out} is inside the store {folder}: choose an --out outside it")


def prepare(run_dir: Path, *, overwrite: bool, resume: bool) -> bool:
    """Make `run_dir` ready for training; True when resuming from its checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SaepipeError(f"--out {run_dir} is a file: pass a folder for the run")
    refuse_inside_store(run_dir)
    if resume:
        if (run_dir / PICKLED_CHECKPOINT).exists() and not (run_dir / CHECKPOINT).exists():
            raise SaepipeError(
                f"{run_dir} holds a checkpoint.pt written by an earlier saepipe: a pickle, which saepipe no "
                f"longer opens (unpickling a file can run any code); pass --overwrite to train again, or "
                f"finish it with the saepipe that started it"
            )
        if (run_dir / CHECKPOINT).exists():
            return True
        if _finished(run_dir):
            raise SaepipeError(
                f"{run_dir} holds a finished run with no checkpoint to resume: pass --overwrite to train again"
            )
        if run_dir.is_dir() and any(run_dir.iterdir()):
            _require_run_folder(run_dir)
            print(
                f"saepipe: {run_dir} has no checkpoint (its run stopped before the first): training starts "
                f"from the beginning",
                file=sys.stderr,
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not any((run_dir / name).exists() for name in (CONFIG, CHECKPOINT, PICKLED_CHECKPOINT)):
            raise SaepipeError(
                f"--out {run_dir} is not a saepipe run folder{' (refusing to overwrite it)' if overwrite else ''}: "
                f"choose another --out"
            )
        if not overwrite:
            raise SaepipeError(
                f"--out {run_dir} is not empty: pass --resume to continue its run, "
                f"--overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _require_run_folder(run_dir: Path) -> None:
    """A non-empty --out to resume holds what a run writes, not someone's other files."""
    if not any((run_dir / name).exists() for name in (CONFIG, CHECKPOINT, TRAIN_LOG, SAE_WEIGHTS)):
        shown = ", ".join(sorted(p.name for p in run_dir.iterdir())[:3])
        raise SaepipeError(f"--out {run_dir} is not a saepipe run folder (it holds {shown}): choose another --out")


def _finished(run_dir: Path) -> bool:
    """Whether the run says it finished (cfg.json is written last, once every file it promises is there).
    Weights with a cfg.json that does not say (or cannot be read) count as finished, as they always did."""
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        config = None
    said = config.get("finished") if isinstance(config, dict) else None
    return said if isinstance(said, bool) else (run_dir / SAE_WEIGHTS).exists()


def write_json_atomic(path: Path, obj) -> None:
    """Replace `path` with `obj` as JSON, atomically and durably (a power cut leaves the old document or the
    new one, never a part of one). A float that is not finite is written as null: NaN is not JSON, and
    browsers and jq refuse a file holding it."""
    write_durably(Path(path), (json.dumps(_finite_or_null(obj), indent=2, allow_nan=False) + "\n").encode())


def _finite_or_null(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


def save_npy_atomic(path: Path, array) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)
    os.replace(tmp, path)


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, its I/O failures raised as the OSError they are (it raises its own error
    type, whose message holds the OS error: a full disk would otherwise be a traceback, not the one line
    the CLI gives for it); a partly written file is removed."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        Path(path).unlink(missing_ok=True)
        raise
    except Exception as e:
        Path(path).unlink(missing_ok=True)
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def save_weights(run_dir: Path, sae: torch.nn.Module) -> None:
    """The SAE's weights as float32 safetensors, written as `write_json_atomic` writes."""
    tmp = run_dir / (SAE_WEIGHTS + ".tmp")
    save_tensors({k: v.detach().float().contiguous().cpu() for k, v in sae.state_dict().items()}, tmp)
    fsync_path(tmp)
    os.replace(tmp, run_dir / SAE_WEIGHTS)
    fsync_path(run_dir)


def read_json(path: Path, fix: str) -> dict:
    """A JSON object the run folder holds; a damaged one is a SaepipeError ending in `fix`."""
    try:
        obj = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise SaepipeError(f"{path} is damaged (not JSON: {e}): {fix}") from None
    if not isinstance(obj, dict):
        raise SaepipeError(f"{path} is damaged (not a JSON object): {fix}")
    return obj


SWEEP_SUMMARY = "sweep.json"  # what `train --sweep` writes in the folder above its runs


def require_not_sweep(folder: Path) -> None:
    """A sweep's folder holds runs, one per setting: name them, not it."""
    if (Path(folder) / SWEEP_SUMMARY).is_file() and not (Path(folder) / CONFIG).exists():
        runs = sorted(p.name for p in Path(folder).iterdir() if (p / CONFIG).exists())
        shown = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
        raise SaepipeError(
            f"{folder} is a sweep's folder, which holds one run per setting ({shown}): pass the runs, "
            f"e.g. {Path(folder) / '*'}"
        )


def load_config(run_dir: Path) -> dict:
    require_not_sweep(run_dir)
    cfg_path = Path(run_dir) / CONFIG
    if not cfg_path.exists():
        raise SaepipeError(f"{run_dir} is not a finished saepipe run (no {CONFIG}): train it with `saepipe train`")
    fix = "train the run again (saepipe train ... --overwrite)"
    config = read_json(cfg_path, fix)
    problem = config_problem(config)
    if problem is not None:
        raise SaepipeError(f"{cfg_path} is damaged ({problem}): {fix}")
    return config


def config_problem(config: dict) -> str | None:
    """What makes `config` not a cfg.json that `saepipe train` wrote, for the fields every reader takes
    as given (the `sae` record is checked against the weights, the hooks and normalizations by
    `recorded_hooks`)."""
    store = config.get("store")
    if not isinstance(store, dict) or not isinstance(store.get("path"), str):
        return "its 'store' record names no store path"
    model = store.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return "store.model names no model"
    for key in ("fingerprint", "config_fingerprint"):
        if key in store and not isinstance(store[key], str):
            return f"store.{key} is {store[key]!r}, not text"
    if not isinstance(config.get("training"), dict):
        return "its 'training' record is missing"
    for key in ("hook", "in_hook", "out_hook"):
        if config.get(key) is not None and not isinstance(config[key], str):
            return f"{key} is {config[key]!r}, not a hook name"
    for key in ("in_hooks", "out_hooks"):
        if key in config and not (isinstance(config[key], list) and all(isinstance(h, str) for h in config[key])):
            return f"{key} is not a list of hook names"
    layers = config.get("layers")
    if layers is not None and not (
        isinstance(layers, list) and len(layers) == 2 and all(isinstance(n, int) and n >= 0 for n in layers)
    ):
        return f"layers is {layers!r}, not [first, last]"
    if "normalization" in config and not isinstance(config["normalization"], dict):
        return f"normalization is {config['normalization']!r}, not a record"
    return None


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / TRAIN_LOG
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # cut short by a run killed while writing it: the resume rewrites it
            raise SaepipeError(
                f"{path} is damaged (line {number} is not JSON: {e}): train the run again "
                f"(saepipe train ... --overwrite)"
            ) from None
    return rows


def truncate_log(run_dir: Path, last_step: int) -> None:
    """Keep log lines up to `last_step` (a resume redoes the steps after its checkpoint)."""
    kept = [row for row in read_log(run_dir) if row["step"] <= last_step]
    tmp = Path(run_dir) / (TRAIN_LOG + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, Path(run_dir) / TRAIN_LOG)
