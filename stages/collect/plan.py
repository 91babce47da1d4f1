"""What a collect does with its --out: create a store, resume one, or find it done."""

from __future__ import annotations

import enum
from pathlib import Path

from stages.basics.errors import SaepipeError
from stages.collect.config import CollectConfig
from store_schema import schema
from store_schema.reader import ActivationStore


class PlanAction(str, enum.Enum):
    """What a collect does with its store."""

    CREATE = "create"  # write a new store (replacing the one --overwrite names)
    RESUME = "resume"  # finish an interrupted collect
    DONE = "done"  # the store is complete for this configuration: nothing to do
    START_APPEND = "start-append"  # grow a complete store (--append)
    RESUME_APPEND = "resume-append"  # finish an interrupted append
    APPEND_DONE = "append-done"  # the store already holds --tokens: nothing to do


def plan_action(cfg: CollectConfig) -> PlanAction:
    """What to do with --out: create, resume or nothing. Refuses to touch another store."""
    out = Path(cfg.out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return PlanAction.CREATE
    try:
        existing = ActivationStore.open(out)
    except schema.StoreError:
        # --overwrite replaces a (possibly damaged) Zarr store, never a file or a folder of something else
        if cfg.overwrite and out.is_dir() and (out / "zarr.json").exists():
            return PlanAction.CREATE
        hint = (
            " (--overwrite replaces only stores; remove it yourself if it must go)"
            if cfg.overwrite
            else ", or pass --overwrite to replace it if it is a damaged store"
        )
        raise SaepipeError(f"--out {out} exists and is not a saepipe store: choose another --out{hint}") from None
    if cfg.overwrite:
        return PlanAction.CREATE
    differing = differing_settings(cfg, existing)
    if differing is not None:
        raise SaepipeError(
            f"--out {out} holds a store of a different configuration (differs in: "
            f"{differing}): pass --overwrite to replace it, or choose another --out"
        )
    return PlanAction.DONE if existing.complete else PlanAction.RESUME


def differing_settings(cfg: CollectConfig, existing: ActivationStore) -> str | None:
    """None when `existing` was collected with cfg's settings; else the ones that differ, listed."""
    theirs = existing.header.collect_config
    ours = cfg.content_fields()
    if existing.header.config_fingerprint == schema.fingerprint(ours):
        return None
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if existing.header.appends:
        differing.append(f"grown by --append to {existing.header.token_budget:,} tokens")
    return ", ".join(differing) or "version"
