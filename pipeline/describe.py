"""`saepipe info`: a short summary of a store or a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from stages.basics import run_dir
from stages.basics.errors import SaepipeError
from stages.basics.eval_record import read_eval
from store_schema.reader import open_store
from store_schema.schema import SCHEMA_NAME, StoreError


def describe(path: str) -> dict:
    p = Path(path)
    if (p / run_dir.SAELENS_WEIGHTS).exists() and not (p / run_dir.SAE_WEIGHTS).exists():
        return describe_saelens(p)
    if (p / run_dir.CONFIG).exists() or (p / run_dir.CHECKPOINT).exists():
        return describe_run(p)

    try:
        return describe_store(open_store(path))
    except StoreError as e:
        raise SaepipeError(f"{path} is neither a saepipe store nor a run folder ({e})") from None


def describe_store(store) -> dict:
    h = store.header
    out = {
        "store": store.location,
        "schema": f"{SCHEMA_NAME} v{h.schema_version} (written by {h.writer})",
        "complete": store.complete,
        "model": f"{h.model.name} (revision {h.model.revision}, d_model {h.d_model}, {h.model.dtype})",
        "text source": h.text_source.get("name"),
        "hooks": ", ".join(
            h if store.width(h) == store.d_model else f"{h} (width {store.width(h)})" for h in store.hooks
        ),
        "context size": f"{h.context_size} (dropped positions {list(h.dropped_positions)})",
        "rows": {s: f"{store.n_rows(s):,} of {h.planned_rows[s]:,} planned" for s in ("train", "eval")},
        "normalization": h.normalization_mode,
        "fingerprint": store.fingerprint,
    }
    for hook in store.hooks:
        stats = store.running_stats("train", hook)
        if stats is not None:
            out[f"train stats {hook}"] = {
                "mean sq norm": round(stats.mean_sq_norm, 4),
                "max |x|": round(stats.max_abs, 3),
                "non-finite values": stats.nonfinite_values,
                "skipped contexts": stats.nonfinite_contexts,
                "outlier rows left out": stats.outlier_rows,
            }
    return out


def describe_saelens(p: Path) -> dict:
    """A SAELens SAE folder (a run's saelens/ export, or SAELens's own): what its cfg.json says."""
    cfg = run_dir.read_json(p / run_dir.CONFIG, "export the run again (saepipe export), or fetch the SAE again")
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return {
        "saelens sae": str(p),
        "architecture": cfg.get("architecture"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "hook": metadata.get("hook_name", cfg.get("hook_name")),
        "model": metadata.get("model_name", cfg.get("model_name")),
        "normalize_activations": cfg.get("normalize_activations"),
        "evaluate with": f"saepipe eval OUT --external {p} --store STORE",
    }


def describe_run(p: Path) -> dict:
    if not (p / run_dir.CONFIG).exists():
        return {"run": str(p), "state": "in progress (checkpoint only)"}
    cfg = run_dir.load_config(p)
    log = run_dir.read_log(p)
    out = {
        "run": str(p),
        "finished": cfg.get("finished", False),
        "sae": json.dumps(cfg["sae"]),
        "hook": _hooks_line(cfg),
        "store": cfg["store"]["path"],
        "normalization": cfg["normalization"]["mode"],
    }
    if log:
        last = log[-1]
        out["last log"] = {k: last[k] for k in ("step", "tokens", "loss", "fve", "l0", "dead_fraction")}
    if (p / run_dir.EVAL).exists():
        ev = read_eval(p / run_dir.EVAL, f"evaluate the run again (saepipe eval {p})")
        out["eval"] = {k: ev[k] for k in ("fve", "l0", "dead_fraction", "ce_recovered", "kl") if k in ev}
    return out


def summary_text(summary: dict, indent: str = "") -> str:
    """`describe`'s summary as indented text."""
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(summary_text(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def _hooks_line(cfg: dict) -> str:
    """The hooks a run reads and writes: one hook, a transcoder's `in -> out`, a crosscoder's `a + b`, or a
    CLT's layer range."""
    if cfg.get("layers") is not None:
        first, last = cfg["layers"]
        return f"layers {first}-{last}: blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out"
    if cfg.get("in_hooks") is not None:
        return " + ".join(cfg["in_hooks"])
    return cfg["hook"] if cfg.get("in_hook") is None else f"{cfg['in_hook']} -> {cfg['out_hook']}"
