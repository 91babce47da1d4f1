"""Stage two: train an SAE from a store, never touching the host model.

The TopK paper's recipe: encoder initialized as the decoder's transpose, unit-norm decoder rows whose
gradient loses its parallel part before each step, b_dec at the geometric median of a sample, MSE
scaled by a constant fixed at the start, AuxK on dead latents, Adam with linear warm-up and decay.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import __version__, run_dir
from pipeline.config import TrainConfig
from pipeline.device import resolve_device
from pipeline.errors import SaepipeError
from stages.saes import ARCHITECTURES, SparseAutoencoder
from stages.saes.base import TrainContext, geometric_median
from store_schema.loader import ShuffledBatches
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


def build_for_store(cfg: TrainConfig, store: ActivationStore, device: torch.device) -> tuple[SparseAutoencoder, float]:
    """A freshly initialized SAE and the loss-scale constant, both from a sample of training rows
    (rows are stored shuffled, so the first rows are a random sample)."""
    sample = torch.from_numpy(store.read_rows("train", cfg.hook, 0, cfg.geometric_median_rows)).float()
    generator = torch.Generator().manual_seed(cfg.seed)
    sae = ARCHITECTURES[cfg.arch].from_config(store.d_model, cfg)
    sae.reset_parameters(generator)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample))
    mse_scale = float((sample - sample.mean(dim=0)).pow(2).sum(dim=-1).mean())
    return sae.to(device), mse_scale


def run_config(cfg: TrainConfig, store: ActivationStore, sae: SparseAutoencoder) -> dict:
    norm = store.normalization(cfg.hook)
    return {
        "saepipe_version": __version__,
        "sae": sae.config(),
        "hook": cfg.hook,
        "d_in": store.d_model,
        "store": {"path": str(Path(store.location).resolve()) if "://" not in store.location else store.location,
                  "fingerprint": store.fingerprint, "config_fingerprint": store.header["config_fingerprint"],
                  "model": store.header["model"], "context_size": store.context_size,
                  "dropped_positions": store.header["dropped_positions"]},
        "normalization": {**norm.to_attrs(), "mean": None if norm.mean is None else norm.mean.tolist()},
        "training": cfg.to_json(),
    }


def run_train(cfg: TrainConfig) -> Path:
    cfg.validate()
    store = open_store(cfg.store)
    store.require_complete()
    store.require_hook(cfg.hook)
    out = Path(cfg.out)
    resuming = run_dir.prepare(out, overwrite=cfg.overwrite, resume=cfg.resume)
    device = resolve_device(cfg.device)
    sae, mse_scale = build_for_store(cfg, store, device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.resolved_lr(), betas=cfg.adam_betas, eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.steps, cfg.warmup_frac, cfg.decay_frac))
    tokens_since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)
    start = 0
    if resuming:
        ckpt = torch.load(out / run_dir.CHECKPOINT, map_location=device, weights_only=False)
        if ckpt["store_fingerprint"] != store.fingerprint or ckpt["config"] != cfg.to_json():
            raise SaepipeError(f"{out} was trained with another store or configuration: pass the same arguments "
                               f"to --resume, or --overwrite to start again")
        sae.load_state_dict(ckpt["sae"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        tokens_since_fired = ckpt["tokens_since_fired"].to(device)
        mse_scale, start = ckpt["mse_scale"], ckpt["step"]
        run_dir.truncate_log(out, start)
    else:
        run_dir.write_json_atomic(out / run_dir.CONFIG, run_config(cfg, store, sae) | {"finished": False})

    loader = ShuffledBatches(store, cfg.hook, cfg.batch_size, device=device, seed=cfg.seed, resident=cfg.resident)
    batches = loader.batches(start)
    dead_window = cfg.dead_window_tokens or min(10_000_000, max(cfg.tokens // 4, cfg.batch_size))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())

    def checkpoint(step: int) -> None:
        run_dir.save_torch_atomic(out / run_dir.CHECKPOINT, {
            "step": step, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "tokens_since_fired": tokens_since_fired, "mse_scale": mse_scale,
            "store_fingerprint": store.fingerprint, "config": cfg.to_json()})

    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    keys = ("loss", "mse", "fve", "l0", "aux_loss")
    sums = torch.zeros(len(keys), device=device)
    window_start, window_steps = time.perf_counter(), 0
    with open(out / run_dir.TRAIN_LOG, "a") as log:
        for step in range(start, cfg.steps):
            x = next(batches)
            dead = tokens_since_fired >= dead_window
            with autocast:
                loss, metrics = sae.training_loss(x, TrainContext(mse_scale, dead, step / cfg.steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae.before_optimizer_step()
            optimizer.step()
            scheduler.step()
            sae.after_optimizer_step()
            tokens_since_fired += cfg.batch_size
            tokens_since_fired[metrics["fire_counts"] > 0] = 0
            sums += torch.stack([metrics[k].float() for k in keys])
            window_steps += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - window_start
                means = (sums / window_steps).tolist()
                row = {"step": done, "tokens": done * cfg.batch_size, **dict(zip(keys, means)),
                       "dead_fraction": float((tokens_since_fired >= dead_window).float().mean()),
                       "lr": scheduler.get_last_lr()[0], "it_per_s": window_steps / elapsed,
                       "tokens_per_s": window_steps * cfg.batch_size / elapsed}
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", fve=f"{row['fve']:.3f}", l0=f"{row['l0']:.1f}",
                                dead=f"{row['dead_fraction']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
                sums.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                log.flush()
                checkpoint(done)
            bar.update(1)
    bar.close()
    finish(cfg, store, sae, out)
    return out


def finish(cfg: TrainConfig, store: ActivationStore, sae: SparseAutoencoder, out: Path) -> None:
    """Final weights, config and the SAELens export; the checkpoint goes once they are safely written."""
    from stages.saelens_export import export_saelens

    run_dir.save_sae(out, sae, run_config(cfg, store, sae) | {"finished": True})
    header = store.header
    export_saelens(out / run_dir.SAELENS, sae, store.normalization(cfg.hook), hook_name=cfg.hook,
                   model_name=header["model"]["name"], context_size=store.context_size,
                   dataset=header["text_source"].get("name", ""),
                   extra_metadata={"saepipe_store_fingerprint": store.fingerprint})
    (out / run_dir.CHECKPOINT).unlink(missing_ok=True)
