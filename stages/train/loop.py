"""Stage two: train an SAE from a store, never touching the host model.

One loop for every architecture: the SAE brings its loss; the loop initializes it from a sample of rows,
and owns the optimizer, the schedule, gradient clipping, the dead-latent clock, logs and checkpoints.

Under torchrun (`saepipe train --nproc N`) the loop is data parallel: every rank builds the same SAE,
reads a disjoint 1/N of each global batch, and DDP averages the gradients; the batch statistics an SAE
needs are taken over the global batch (stages.basics.distributed), so N ranks train what one process would.
Rank 0 alone writes the run folder.

The recipe (the TopK paper's, plus gradient clipping): docs/architectures.md#the-shared-training-recipe
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from stages import __version__
from stages.basics import distributed, run_dir
from stages.basics.device import resolve_device
from stages.basics.errors import SaepipeError
from stages.basics.tracking import Tracker, require_wandb
from stages.saes import MULTI_HOOK_ARCHS, SparseAutoencoder, new_sae
from stages.saes.base import TrainContext, geometric_median, nonfinite_tensors
from stages.train.checkpoint import Checkpoint
from stages.train.config import TrainConfig, only_hook
from stages.train.memory_check import require_room, training_bytes
from stages.train.saelens_export import export_saelens
from stages.train.transcoder_export import export_saelens_transcoder
from store_schema.loader import RowAlignedBatches, ShuffledBatches, batches_of
from store_schema.lock import StoreLock
from store_schema.reader import ActivationStore, open_store


def lr_schedule(steps: int, warmup_frac: float, decay_frac: float):
    """Multiplier of the base rate at each step: linear warm-up, constant, linear decay to zero."""
    warmup = int(steps * warmup_frac)
    decay = int(steps * decay_frac)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay and step >= steps - decay:
            return max(0.0, (steps - step) / decay)
        return 1.0

    return factor


def build_for_store(
    cfg: TrainConfig, store: ActivationStore, device: torch.device, sample: torch.Tensor | None = None
) -> tuple[SparseAutoencoder, float]:
    """A freshly initialized SAE and the loss-scale constant, both from a sample of training rows
    (rows are stored shuffled, so the first rows are a random sample). `sample`: those first rows,
    when already read (at least cfg.geometric_median_rows of them)."""
    if sample is None:
        sample = read_sample(store, cfg.read_hooks, cfg.geometric_median_rows)
    sample = sample[: cfg.geometric_median_rows].float()
    generator = torch.Generator().manual_seed(cfg.seed)
    d_in, shape = sae_shape(cfg, store)
    sae = new_sae(cfg.arch, cfg.activation, d_in, cfg.width, cfg.settings, **shape)
    sae.reset_parameters(generator)
    target = sae.target_rows(sample)  # what the decoder reconstructs: the rows, or a transcoder's output
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(target))
    mse_scale = float((target - target.mean(dim=0)).pow(2).sum(dim=-1).mean())
    return sae.to(device), mse_scale


def sae_shape(cfg: TrainConfig, store: ActivationStore) -> tuple[int, dict]:
    """(d_in, the other sizes an architecture is built with) from the widths of the store's hooks."""
    return cfg.sae_class.shape_for(cfg.io, store.width)


def _training_bytes(cfg: TrainConfig, store: ActivationStore) -> int:
    d_in, shape = sae_shape(cfg, store)
    return training_bytes(cfg.arch, cfg.activation, d_in, cfg.width, cfg.settings, cfg.batch_size, **shape)


def read_sample(store: ActivationStore, hooks: tuple[str, ...], rows: int) -> torch.Tensor:
    """The first `rows` training rows of each hook, side by side (fp16)."""
    return torch.cat([torch.from_numpy(store.read_rows("train", hook, 0, rows)) for hook in hooks], dim=1)


def run_config(cfg: TrainConfig, store: ActivationStore, sae: SparseAutoencoder) -> dict:
    """cfg.json: the SAE, the hooks it reads and writes with their normalizations, the store, the training."""

    def normalization(hook: str) -> dict:
        return _normalization_record(store.normalization(hook))

    hooks = {"hook": cfg.hook, **cfg.sae_class.hook_record(cfg.io, store.width, normalization)}
    return {
        "saepipe_version": __version__,
        "sae": sae.config(),
        **hooks,
        "d_in": sae.d_in,
        "store": {
            "path": str(Path(store.location).resolve()) if "://" not in store.location else store.location,
            "fingerprint": store.fingerprint,
            "config_fingerprint": store.header.config_fingerprint,
            **store.header.records("model"),
            "context_size": store.context_size,
            "dropped_positions": list(store.header.dropped_positions),
        },
        "normalization": _normalization_record(store.normalization(cfg.read_hooks[0])),
        "training": cfg.to_json(),
    }


def _normalization_record(norm) -> dict:
    """A normalization as cfg.json records it (stages.evaluate.evaluated.normalization_of reads it back)."""
    return {**norm.to_attrs(), "mean": None if norm.mean is None else norm.mean.tolist()}


class _TrainingLoss(torch.nn.Module):
    """The SAE's training loss as a module's forward, the call DDP synchronizes gradients around."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...], ctx: TrainContext):
        return self.sae.training_loss(x, ctx)


class TrainingRun:
    """One SAE being trained: its optimizer, schedule, dead-latent clock, log and checkpoints."""

    KEYS = ("loss", "mse", "fve", "l0", "aux_loss")

    def __init__(
        self,
        cfg: TrainConfig,
        store: ActivationStore,
        device: torch.device,
        resuming: bool,
        world: distributed.World,
        sample: torch.Tensor | None = None,
    ):
        self.cfg, self.store, self.out, self.world = cfg, store, Path(cfg.out), world
        self.sae, self.mse_scale = build_for_store(cfg, store, device, sample)
        self.loss = _TrainingLoss(self.sae)
        if distributed.active():
            self.loss = DistributedDataParallel(self.loss, device_ids=[device.index] if device.type == "cuda" else None)
        # fused: one kernel per parameter instead of a dozen passes over it (Adam's step went from 10.3 to
        # 1.4 ms at width 4,096, and from 40 to 5.5 ms at 16,384, on this project's 2-core CPU)
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(),
            lr=cfg.resolved_lr(),
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            fused=device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(cfg.steps, cfg.warmup_frac, cfg.decay_frac)
        )
        self.tokens_since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        self.dead_window = cfg.dead_window_tokens or min(10_000_000, max(cfg.tokens // 4, cfg.batch_size))
        self.start = 0
        if resuming:
            ckpt = Checkpoint.load(self.out / run_dir.CHECKPOINT)
            _require_same_run(ckpt, cfg, store, self.out)
            self.sae.load_state_dict(ckpt.sae)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.scheduler.load_state_dict(ckpt.scheduler)
            self.tokens_since_fired = ckpt.tokens_since_fired.to(device)
            self.mse_scale, self.start = ckpt.mse_scale, ckpt.step
            if world.is_main:
                run_dir.truncate_log(self.out, self.start)
        config = run_config(cfg, store, self.sae) | {"finished": False}
        # Rank 0 alone tracks. It starts before cfg.json is written, so a wandb run that cannot start leaves
        # a fresh run folder empty (the same command then runs again as it is).
        self.tracker = Tracker.start(self.out, cfg.wandb, cfg.wandb_run, config) if world.is_main else Tracker()
        try:
            # a wandb run new to a resumed run gets the lines kept so far; the same wandb run has them already
            self.tracker.log_rows(run_dir.read_log(self.out) if resuming and world.is_main else [])
            if not resuming and world.is_main:
                run_dir.write_json_atomic(self.out / run_dir.CONFIG, config)
            # a fresh run starts a fresh log (an earlier attempt that stopped before its first checkpoint left lines)
            self.log = open(self.out / run_dir.TRAIN_LOG, "a" if resuming else "w") if world.is_main else None
        except BaseException:
            self.tracker.fail()
            raise
        self.keys = self.KEYS + self.sae.extra_log_keys
        self.sums = torch.zeros(len(self.keys), device=device)
        # the first step whose loss was not finite (-1: none yet), kept on the device: no sync per step
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def step(self, x: torch.Tensor | tuple[torch.Tensor, ...], step: int, autocast) -> None:
        """One optimizer step on batch x (a transcoder's: the pair of its hooks' row-aligned batches)."""
        dead = self.tokens_since_fired >= self.dead_window
        with autocast:  # the forward only; backward runs in the dtypes the forward chose
            loss, metrics = self.loss(x, TrainContext(self.mse_scale, dead, step / self.cfg.steps))
        first = self.first_bad_step
        self.first_bad_step = torch.where((first < 0) & ~torch.isfinite(loss.detach()), step, first)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.before_optimizer_step()
        if self.cfg.max_grad_norm:
            # Our loss is the squared error divided by mse_scale: scale the threshold alike.
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.max_grad_norm / self.mse_scale)
        self.optimizer.step()
        self.scheduler.step()
        self.sae.after_optimizer_step()
        self.tokens_since_fired += self.cfg.batch_size
        # A latent fired if it fired on any rank's rows: every rank keeps the same dead-latent clock.
        self.tokens_since_fired[distributed.sum_(metrics["fire_counts"]) > 0] = 0
        self.sums += torch.stack([metrics[k].float() for k in self.keys])

    def divergence(self) -> str | None:
        """Why this run must stop (a loss that was not finite: the weights are garbage from that step on, and
        nothing more of it may be written; its last checkpoint, taken before, stays), or None. Every rank
        calls this (a sync), so every rank decides alike."""
        first = int(distributed.max_(self.first_bad_step.clone()))
        if first < 0:
            return None
        return diverged(self.out, self.cfg.store, f"the loss was not finite (NaN or inf) at step {first}")

    def write_log(self, done: int, window_steps: int, elapsed: float) -> dict:
        """Every rank calls this (the metrics are averaged over ranks); rank 0 writes the line."""
        distributed.mean_(self.sums)
        row = {
            "step": done,
            "tokens": done * self.cfg.batch_size,
            **dict(zip(self.keys, (self.sums / window_steps).tolist())),
            "dead_fraction": float((self.tokens_since_fired >= self.dead_window).float().mean()),
            "lr": self.scheduler.get_last_lr()[0],
            "it_per_s": window_steps / elapsed,
            "tokens_per_s": window_steps * self.cfg.batch_size / elapsed,
        }
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
            self.tracker.log(row)
        self.sums.zero_()
        return row

    def checkpoint(self, step: int) -> None:
        if not self.world.is_main:
            return
        Checkpoint(
            step=step,
            sae=self.sae.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            tokens_since_fired=self.tokens_since_fired,
            mse_scale=self.mse_scale,
            store_fingerprint=self.store.fingerprint,
            config=self.cfg.to_json(),
        ).save(self.out / run_dir.CHECKPOINT)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def run_train(cfg: TrainConfig, nproc: int = 1) -> Path:
    """Train one SAE (a sweep of one)."""
    return run_sweep([cfg], nproc)[0]


def run_sweep(cfgs: list[TrainConfig], nproc: int = 1) -> list[Path]:
    """Train several SAEs from one pass over the store: each batch is read and moved to the device once
    and fed to every SAE. The configurations must share the store, hook, batch size, token budget and
    data seed (see sweeps.expand); each SAE writes its own run folder. Under torchrun, or with
    `nproc` > 1 (which starts `nproc` processes here through torch's launcher), data parallel (see the
    module docstring). A config without a hook trains on the store's only one."""
    if cfgs[0].hook is None and not cfgs[0].hooks and cfgs[0].arch not in MULTI_HOOK_ARCHS:
        hook = only_hook(open_store(cfgs[0].store).hooks)
        cfgs = [dataclasses.replace(cfg, hook=hook) for cfg in cfgs]
    for cfg in cfgs:
        cfg.validate()
        run_dir.refuse_inside_store(Path(cfg.out))  # before its lock, which is written beside the folder
    if any(cfg.wandb for cfg in cfgs):
        require_wandb()  # a missing wandb is refused before any work
    base = cfgs[0]
    device = resolve_device(base.device)
    if distributed.launched_by_torchrun():  # the process that launched the ranks holds the run folders' locks
        return _train_here(cfgs, device, nproc)
    with contextlib.ExitStack() as locks:  # one writer per run folder, as per store
        for cfg in cfgs:
            locks.enter_context(StoreLock(cfg.out, kind="run folder"))
        return _train_here(cfgs, device, nproc)


def _train_here(cfgs: list[TrainConfig], device: torch.device, nproc: int) -> list[Path]:
    """Train in this process, or launch `nproc` processes that do."""
    if nproc > 1 and not distributed.launched_by_torchrun():
        _check_before_launch(cfgs, device, nproc)
        return distributed.launch(nproc, run_sweep, cfgs)
    world = distributed.start(device.type)
    try:
        return _train(cfgs, device, world)
    finally:
        if world.size > 1:
            distributed.stop()


def _open_checked(cfgs: list[TrainConfig], device: torch.device, world: distributed.World):
    """What can refuse the run, done before its folder is touched: the store and hook, the batch split
    over the ranks, the loader's size checks, and reading (and checksumming) the first chunks, the
    initialization sample. Returns (store, loader, sample)."""
    base = cfgs[0]
    distributed.check_divides(base.batch_size, world.size)
    store = open_store(base.store)
    store.require_complete()
    _require_hooks(base, store)
    require_room([(f"{cfg.out} (--width {cfg.width:,})", _training_bytes(cfg, store)) for cfg in cfgs], device)
    for hook in base.io.writes if base.io.transcodes else ():
        if store.normalization(hook).has_row_stats:
            raise SaepipeError(
                f"store {store.location} normalizes {hook} per token (mode token): a transcoder's prediction "
                f"cannot be mapped back without the true row's own mean and scale; collect with --normalize center-scale"
            )
    loader = batches_of(
        store,
        base.read_hooks,
        base.batch_size,
        device=device,
        seed=base.seed,
        resident=base.resident,
        rank=world.rank,
        world_size=world.size,
    )
    sample = read_sample(store, base.read_hooks, max(c.geometric_median_rows for c in cfgs))
    return store, loader, sample


def _require_hooks(cfg: TrainConfig, store: ActivationStore) -> None:
    """The store holds every hook the run reads (an architecture may say how to collect those it lacks)."""
    missing = [hook for hook in cfg.read_hooks if hook not in store.hooks]
    explained = missing and cfg.sae_class.missing_hooks_error(cfg.io, store.location, missing)
    if explained:
        raise SaepipeError(explained)
    for hook in cfg.read_hooks:
        store.require_hook(hook)


def _train(cfgs: list[TrainConfig], device: torch.device, world: distributed.World) -> list[Path]:
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    store, loader, sample = _open_checked(cfgs, device, world)
    resuming = distributed.broadcast_object(_prepare_run_folders(cfgs) if world.is_main else None)
    if isinstance(resuming, SaepipeError):
        raise resuming
    runs: list[TrainingRun] = []
    try:
        for c, r in zip(cfgs, resuming):
            runs.append(TrainingRun(c, store, device, r, world, sample))
        _train_runs(runs, store, loader, device, world)
    except BaseException:  # an error, Ctrl-C or SIGTERM: the wandb runs close as failed rather than hang
        for run in runs:
            run.tracker.fail()
        raise
    return [run.out for run in runs]


def _train_runs(
    runs: list[TrainingRun],
    store: ActivationStore,
    loader: ShuffledBatches | RowAlignedBatches,
    device: torch.device,
    world: distributed.World,
) -> None:
    base = runs[0].cfg
    starts = {run.start for run in runs}
    if len(starts) > 1:
        raise SaepipeError(
            f"the sweep's checkpoints are at different steps ({sorted(starts)}): "
            f"resume the runs one by one, or --overwrite"
        )
    start = starts.pop()
    batches = loader.batches(start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(
        total=base.steps,
        initial=start,
        desc="train" if len(runs) == 1 else f"train x{len(runs)}",
        unit="step",
        disable=not (base.progress and world.is_main),
        dynamic_ncols=True,
    )
    window_start, window_steps = time.perf_counter(), 0
    active, stopped = list(runs), []  # a sweep's runs go on when one of them diverges
    try:
        for step in range(start, base.steps):
            x = next(batches)
            for run in active:
                run.step(x, step, autocast)
            window_steps += 1
            done = step + 1
            logging = done % base.log_every == 0 or done == base.steps
            checkpointing = done % base.checkpoint_every == 0 and done < base.steps
            if logging or checkpointing:  # nothing of a diverged run is written: no log line, no checkpoint
                for run in list(active):
                    problem = run.divergence()
                    if problem is not None:
                        active.remove(run)
                        stopped.append(problem)
                        if len(runs) > 1 and world.is_main:
                            print(f"saepipe: {problem}; the sweep's other runs go on", file=sys.stderr)
                if not active:
                    break
            if logging:
                elapsed = time.perf_counter() - window_start
                rows = [run.write_log(done, window_steps, elapsed) for run in active]
                row = rows[0]
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    fve=f"{row['fve']:.3f}",
                    l0=f"{row['l0']:.1f}",
                    dead=f"{row['dead_fraction']:.3f}",
                    tok_s=f"{row['tokens_per_s']:,.0f}",
                )
                window_start, window_steps = time.perf_counter(), 0
            if checkpointing:
                for run in active:
                    run.checkpoint(done)
            bar.update(1)
    finally:
        batches.close()  # stops and joins the loader's read-ahead thread
        for run in runs:
            run.close()
    bar.close()
    if world.is_main:
        for run in active:
            finish(run.cfg, store, run.sae, run.out)
            run.tracker.finish(run_dir.load_config(run.out))
    distributed.barrier()  # the run folders are complete when any rank returns
    if stopped:
        for run in runs:
            if run not in active:
                run.tracker.fail()
        if len(runs) == 1:
            raise SaepipeError(stopped[0])
        raise SaepipeError(
            f"{len(stopped)} of the sweep's {len(runs)} runs stopped, the others finished; the first: {stopped[0]}"
        )


def _check_before_launch(cfgs: list[TrainConfig], device: torch.device, nproc: int) -> None:
    """What would stop every rank, checked once here so it reads as one clean error (the ranks then find
    the run folders ready). The checks run as rank 0 would, on the CPU: this process uses no GPU."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise SaepipeError(
            f"--nproc {nproc} asks for more processes than the {torch.cuda.device_count()} GPUs "
            f"here: one process per GPU"
        )
    _open_checked(cfgs, torch.device("cpu"), distributed.World(rank=0, size=nproc))
    prepared = _prepare_run_folders(cfgs)
    if isinstance(prepared, SaepipeError):
        raise prepared


def _prepare_run_folders(cfgs: list[TrainConfig]) -> list[bool] | SaepipeError:
    """Whether each run resumes, or the error that stops them all (handed to every rank to raise)."""
    try:
        return [run_dir.prepare(Path(c.out), overwrite=c.overwrite, resume=c.resume) for c in cfgs]
    except SaepipeError as e:
        return e


# Where a run's files are, not what it computes: a store or run folder moved, copied, or named by another
# path (./s.zarr, an absolute path, another working directory) is the same run. The store's identity is
# its fingerprint.
_PATH_SETTINGS = ("store", "out")


def _require_same_run(ckpt: Checkpoint, cfg: TrainConfig, store: ActivationStore, out: Path) -> None:
    """--resume continues the checkpoint's run: the same store (by fingerprint) and the same settings."""
    if ckpt.store_fingerprint != store.fingerprint:
        raise SaepipeError(
            f"{out} was trained with another store (fingerprint {ckpt.store_fingerprint}; {store.location} has "
            f"{store.fingerprint}): pass the store it was trained on to --resume, or --overwrite to start again"
        )
    # the checkpoint holds the configuration as JSON (tuples as lists): compare it as JSON
    ours = {k: v for k, v in json.loads(json.dumps(cfg.to_json())).items() if k not in _PATH_SETTINGS}
    theirs = {k: v for k, v in ckpt.config.items() if k not in _PATH_SETTINGS}
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        raise SaepipeError(
            f"{out} was trained with other settings (differs in: {', '.join(differing)}): pass the same "
            f"arguments to --resume, or --overwrite to start again"
        )


def diverged(out: Path, store: str, what: str) -> str:
    """The one line of a run stopped by non-finite values: where, what is kept, the likely causes."""
    return (
        f"training of {out} stopped: {what}; nothing of it was marked finished, and its last checkpoint (if "
        f"any) is kept. Likely causes: non-finite rows in the store (run `saepipe store verify {store}`), or a "
        f"learning rate too high for this architecture (a lower --lr, with --overwrite)"
    )


def finish(cfg: TrainConfig, store: ActivationStore, sae: SparseAutoencoder, out: Path) -> None:
    """The final weights and the SAELens export, then cfg.json saying the run finished: written last, so a
    run that says so has every file it promises. The checkpoint goes once they are all safely written."""
    bad = nonfinite_tensors(sae.state_dict())
    if bad:
        raise SaepipeError(diverged(out, cfg.store, f"its final weights hold non-finite values ({', '.join(bad)})"))
    run_dir.save_weights(out, sae)
    header = store.header
    provenance = {
        "model_name": header.model.name,
        "context_size": store.context_size,
        "dataset": header.text_source.get("name", ""),
        "extra_metadata": {"saepipe_store_fingerprint": store.fingerprint},
    }
    io, export = cfg.io, out / run_dir.SAELENS
    if sae.saelens_format is None:
        print(f"saepipe: no SAELens export for {out}: SAELens has no {cfg.arch} format", file=sys.stderr)
    elif sae.saelens_format == "sae":
        (hook,) = io.reads
        export_saelens(export, sae, store.normalization(hook), hook_name=hook, **provenance)
    else:
        (in_hook,), (out_hook,) = io.reads, io.writes
        norms = store.normalization(in_hook), store.normalization(out_hook)
        try:
            export_saelens_transcoder(export, sae, *norms, in_hook=in_hook, out_hook=out_hook, **provenance)
        except ValueError as e:  # what SAELens cannot hold: the run folder is complete without it
            print(f"saepipe: no SAELens export for {out}: {e}", file=sys.stderr)
    run_dir.write_json_atomic(out / run_dir.CONFIG, run_config(cfg, store, sae) | {"finished": True})
    (out / run_dir.CHECKPOINT).unlink(missing_ok=True)
