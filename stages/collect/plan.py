"""What a collect does with its --out: create a store, resume one, or find it done."""

from __future__ import annotations

from pathlib import Path

from stages.basics.errors import SaepipeError
from stages.collect.config import CollectConfig
from store_schema import schema
from store_schema.reader import ActivationStore


def plan_action(cfg: CollectConfig) -> str:
    """What to do with --out: 'create', 'resume' or 'done'. Refuses to touch another store."""
    out = Path(cfg.out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "create"
    try:
        existing = ActivationStore.open(out)
    except schema.StoreError:
        # --overwrite replaces a (possibly damaged) Zarr store, never a file or a folder of something else
        if cfg.overwrite and out.is_dir() and (out / "zarr.json").exists():
            return "create"
        hint = (
            " (--overwrite replaces only stores; remove it yourself if it must go)"
            if cfg.overwrite
            else ", or pass --overwrite to replace it if it is a damaged store"
        )
        raise SaepipeError(f"--out {out} exists and is not a saepipe store: choose another --out{hint}") from None
    if cfg.overwrite:
        return "create"
    differing = differing_settings(cfg, existing)
    if differing is not None:
        raise SaepipeError(
            f"--out {out} holds a store of a different configuration (differs in: "
            f"{differing}): pass --overwrite to replace it, or choose another --out"
        )
    return "done" if existing.complete else "resume"


def differing_settings(cfg: CollectConfig, existing: ActivationStore) -> str | None:
    """None when `existing` was collected with cfg's settings; else the ones that differ, listed."""
    theirs = existing.header.get("collect_config", {})
    ours = cfg.content_fields()
    if existing.header.get("config_fingerprint") == schema.fingerprint(ours):
        return None
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if existing.header.get("appends"):
        differing.append(f"grown by --append to {existing.header['token_budget']:,} tokens")
    return ", ".join(differing) or "version"
