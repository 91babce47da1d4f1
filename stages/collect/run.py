"""`run_collect`: plan, lock, create or resume the store, fill it here or on dask workers, finalize it;
a store to a URL is collected into a local staging store first and copied there.

A killed collect resumes at the first uncommitted block and ends bit-identical to an uninterrupted
run, whichever way either part ran."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
from pathlib import Path

from stages.basics.cache import cache_dir
from stages.basics.errors import SaepipeError
from stages.collect import append, on_dask
from stages.collect.config import CollectConfig
from stages.collect.header import create_store
from stages.collect.local import fill_store_here
from stages.collect.plan import PlanAction, differing_settings, plan_action
from stages.collect.room import require_disk_room
from stages.host_model.loading import load_host_model
from stages.host_model.model import validate_hooks
from store_schema import schema
from store_schema.copy import copy_store, store_filesystem
from store_schema.lease import ObjectLease
from store_schema.lock import StoreLock
from store_schema.mirror import RemoteMirror
from store_schema.reader import ActivationStore
from store_schema.writer import StoreWriter


def run_collect(cfg: CollectConfig, model=None) -> str:
    """Collect the store `cfg` describes. `model`: an already loaded HostModel of cfg.model (benchmarks
    time the collect without the load). One collect at a time writes a store (store_schema.lock)."""
    cfg.validate()
    if cfg.append:
        if _is_remote(cfg.out):
            raise SaepipeError(
                f"--append needs a store on this machine, not {cfg.out}: copy it here with `saepipe "
                f"store copy`, append, and copy it back"
            )

        cfg = append.store_config(cfg)
    elif str(cfg.out).startswith("s3://"):
        return _collect_to_s3(cfg, model)
    elif _is_remote(cfg.out):
        return _collect_to_remote(cfg, model)
    with StoreLock(cfg.out):
        return str(_collect_locked(cfg, model))


def _is_remote(out: str) -> bool:
    return "://" in str(out) and not str(out).startswith("file://")


def _collect_to_s3(cfg: CollectConfig, model) -> str:
    """--out s3://...: collect into a small local staging store mirrored to the bucket at every commit
    (store_schema.mirror), under a lease that keeps collects on other machines out (store_schema.lease).
    A resumed collect rebuilds the staging store from the bucket, wherever it runs."""
    fs, remote_root = store_filesystem(cfg.out)
    staging = _staging_path(cfg.out)
    with ObjectLease(fs, remote_root, cfg.out) as lease:
        mirror = RemoteMirror(fs, remote_root, cfg.out, staging, lease)
        header = mirror.remote_header()
        if header is not None:
            if header.complete and not cfg.overwrite:
                _refuse_another_configuration(cfg, ActivationStore.open(cfg.out))
                return str(cfg.out)
            print(f"resuming {cfg.out} from the bucket (staging store {staging})", file=sys.stderr)
            mirror.rebuild(header)
        else:
            print(f"collecting into {cfg.out} through the staging store {staging}", file=sys.stderr)
        local = dataclasses.replace(cfg, out=str(staging), fsync=False, overwrite=False, mirrored=True)
        try:
            with StoreLock(staging):
                _collect_locked(local, model, after_commit=mirror.sync)
                mirror.flush()  # every commit in the bucket before the lease goes
        finally:
            mirror.close()  # no upload outlives the lease
    shutil.rmtree(staging)
    return str(cfg.out)


def _staging_path(url: str) -> Path:
    return cache_dir() / "staging" / (hashlib.sha256(str(url).encode()).hexdigest()[:16] + ".zarr")


def _refuse_another_configuration(cfg: CollectConfig, existing: ActivationStore) -> None:
    """Refuse a complete remote store of other settings (a remote store is never overwritten); for one of
    cfg's own, say there is nothing to do."""
    differing = differing_settings(cfg, existing)
    if differing is not None:
        raise SaepipeError(
            f"--out {cfg.out} holds a store of a different configuration (differs in: "
            f"{differing}): choose another --out (a remote store is never overwritten; "
            f"delete it there first)"
        )
    print(f"store {cfg.out} is already complete for this configuration; nothing to do", file=sys.stderr)


def _collect_to_remote(cfg: CollectConfig, model) -> str:
    """--out s3://... (any fsspec URL): collect into a local staging store (resumable like any collect,
    kept under the cache folder), then `store copy` it to the URL (resumable too; the root metadata
    goes last, so the URL never holds a half store)."""
    try:
        existing = ActivationStore.open(cfg.out)
    except schema.StoreError:
        existing = None
    if existing is not None and existing.complete and not cfg.overwrite:
        _refuse_another_configuration(cfg, existing)
        return str(cfg.out)
    staging = _staging_path(cfg.out)
    print(f"collecting into the local staging store {staging}, then copying it to {cfg.out}", file=sys.stderr)
    local = dataclasses.replace(cfg, out=str(staging))
    with StoreLock(staging):
        _collect_locked(local, model)
    copy_store(str(staging), str(cfg.out), progress=cfg.progress)
    shutil.rmtree(staging)
    return str(cfg.out)


def _collect_locked(cfg: CollectConfig, model, after_commit=None) -> Path:
    """`after_commit`: called with the writer after every commit of its root metadata."""
    out = Path(cfg.out)
    if cfg.append:
        action = append.plan(cfg)
    else:
        action = plan_action(cfg)
    if action is PlanAction.APPEND_DONE:
        print(f"store {out} already holds {cfg.tokens:,} tokens; nothing to do", file=sys.stderr)
        return out
    if action is PlanAction.DONE:
        print(f"store {out} is already complete for this configuration; nothing to do", file=sys.stderr)
        return out
    if cfg.distributed:
        if model is not None:
            raise ValueError("a collect across dask workers loads the model on each worker: pass no model")
        if action is not PlanAction.CREATE:
            _refuse_workers_on_shards(out)

        with on_dask.connect(cfg) as client:
            model_summary = on_dask.describe_model(client, cfg)
            writer = _open_or_create(cfg, model_summary, model_summary.hooks, action)
            writer.after_commit = after_commit
            on_dask.fill_store_on_workers(cfg, client, writer, model_summary)
    else:
        if model is None:
            model = load_host_model(cfg.model, cfg.device, cfg.dtype)
        hooks = validate_hooks(model, list(cfg.hooks))
        writer = _open_or_create(cfg, model, hooks, action)
        writer.after_commit = after_commit
        fill_store_here(cfg, model, hooks, writer)
    writer.finalize()
    return out


def _refuse_workers_on_shards(out: Path) -> None:
    """Dask workers write the chunks of a block side by side, each its own file: a store that keeps its
    rows in shards (many chunks to a file) is continued by one process."""
    shard_rows = ActivationStore.open(out).header.shard_rows
    if shard_rows is not None:
        raise SaepipeError(
            f"store {out} keeps its rows in shards of {shard_rows:,} rows, which dask workers cannot write "
            f"side by side: continue it without --workers/--scheduler"
        )


def _open_or_create(cfg: CollectConfig, model, hooks: list[str], action: PlanAction) -> StoreWriter:
    """The writer of a new store, of the interrupted one to resume, or of the store to append to.
    `model`: a HostModel, or anything with its tokenizer, revision, d_model and n_layers (what dask
    workers report)."""
    out = Path(cfg.out)
    if action is PlanAction.CREATE:
        if cfg.context_size > model.n_ctx:  # refused before the store exists: nothing to resume
            raise SaepipeError(
                f"--context-size {cfg.context_size:,} is more than {cfg.model} takes: its contexts hold at most "
                f"{model.n_ctx:,} tokens; pass --context-size {model.n_ctx} or less"
            )
        if not cfg.mirrored:  # the bucket keeps a collect to S3; its staging holds a few blocks at a time
            widths = [model.hook_width(hook) for hook in hooks]
            require_disk_room(out, cfg.tokens, cfg.eval_fraction, hooks, widths)
        if out.exists():
            shutil.rmtree(out)
        return create_store(cfg, model, hooks)
    writer = StoreWriter.open(out, durable=cfg.fsync)
    writer.remove_leftover_temporaries()  # we hold the lock and no worker has started
    if writer.header.model.revision != model.revision:
        raise SaepipeError(
            f"{out} was collected from other weights of {cfg.model} "
            f"(revision {writer.header.model.revision}, now {model.revision}): "
            + ("an append needs the store's model" if cfg.append else "pass --overwrite to start again")
        )
    if action is PlanAction.START_APPEND:
        append.begin(cfg, model, writer)
        return writer
    done = {s: writer.progress(s).rows_committed for s in schema.SPLITS}
    print(
        f"resuming {'the append to ' if cfg.append else ''}{out}: {done['train']:,} train and {done['eval']:,} "
        f"eval rows committed",
        file=sys.stderr,
    )
    return writer
