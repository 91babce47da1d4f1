"""Benchmarks (`python -m benchmarks bench`, `make bench`): speed as ratios measured in one run on one machine.

Absolute times on shared machines drift, so every figure is a ratio of two sides measured in the same
run, alternating the sides round by round; each side's rate is the median over its rounds. The raw
timings behind every ratio go into bench.json beside the ratios.

Keys (targets in docs/benchmarks.md):
- read_vs_memmap: shuffled training batches from the store's streaming reader, over a sequential
  np.memmap read of the same bytes (page cache warm for both).
- api_read_vs_loader: the public API's Store.batches (pipeline.api) over the loader it wraps, same rows;
  each round of each side starts its own iterator, so no side's read-ahead runs during the other's.
- two_hooks_read_vs_one: bytes per second of two hooks' rows read together, row-aligned (what a
  transcoder trains on), over one hook's, each side alone in its rounds.
- train_roofline_fraction: FLOP/s of a full TopK training step (encoder forward, encoder weight gradient,
  sparse decoder forward and backward) over the dense matmul rate measured at the step's own GEMM shape.
- train_vs_saelens / mp_vs_saelens: our training step over SAELens's (its trainer's own step: forward,
  backward, clipping, Adam, dead-latent bookkeeping), same sizes, same in-memory batches.
- train_vs_sparsify / train_vs_sparsify_16k: our TopK training step over EleutherAI sparsify's (its
  Trainer's step for an autoencoder, with its own kernels: decoder renormalized, fvu loss, the decoder
  gradient's parallel part removed, its default optimizer, dead-latent bookkeeping), same batches, at
  --width and at --wide-width.
- collect_vs_forward: collect (to disk, normalized, shuffled, every commit flushed) over the bare forward
  pass: HF's own model loaded from the same checkpoint with SDPA attention, stopped after the same block,
  same contexts, same batch (the bridge's forward for a model with no HF checkpoint, tiny-random).
- fsync_cost: collect_vs_forward without flushing commits (--no-fsync) minus collect_vs_forward.
- collect_vs_saelens: collect over SAELens's CacheActivationsRunner, same model, hook, contexts, batch.
- stream_peak_rss_gb: peak RSS of a training process streaming from a store 4x its loader's buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import re
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from benchmarks.child import peak_rss_bytes, run_in_child
from benchmarks.collect_ceiling import bench_collect_ceiling
from benchmarks.measurements import alternate, ratio, run_parts, targets_table
from benchmarks.quality import saelens_training_sae
from pipeline import api
from stages.basics import run_dir
from stages.basics.defaults import DEFAULT_HOOK, DEFAULT_MODEL
from stages.basics.device import resolve_device, synchronize
from stages.basics.distributed import World
from stages.basics.errors import SaepipeError
from stages.basics.settings import device_setting, progress_setting, setting
from stages.collect import run_collect
from stages.collect.config import DEFAULT_SHARD_CHUNKS, CollectConfig
from stages.host_model.loading import load_host_model
from stages.host_model.model import hook_layer, run_to_hooks, validate_hooks
from stages.host_model.smollm2 import prepare_default_model
from stages.saes.matching_pursuit import MatchingPursuitSAE
from stages.text.sources import open_text_source
from stages.train.config import TrainConfig
from stages.train.loop import TrainingRun, run_train
from store_schema.generated import write_array_store
from store_schema.loader import RowAlignedBatches, ShuffledBatches
from store_schema.reader import ActivationStore, open_store

# sae_lens (and the datasets cache its activation runner writes) is optional, the test extra: imported
# by the benchmarks that run it.

TARGETS = {
    "read_vs_memmap": (">=", 0.7),
    "api_read_vs_loader": (">=", 0.95),  # what a teammate's loop gets from pipeline.api, over the loader
    "two_hooks_read_vs_one": (">=", 0.9),  # bytes/s of a transcoder's two hooks read together, over one hook's
    "train_roofline_fraction": (">=", 0.7),  # CPU fp32; 0.5 on a GPU in bf16
    "train_vs_saelens": (">=", 1.5),  # CPU; 3 on a GPU
    "train_vs_sparsify": (">=", 1.5),
    "train_vs_sparsify_16k": (">=", 1.5),
    "mp_vs_saelens": (">=", 5.0),
    "collect_vs_forward": (">=", 0.95),  # against HF's own forward pass with SDPA attention
    "fsync_cost": ("<=", 0.02),  # collect_vs_forward lost to flushing every commit
    "collect_vs_saelens": (">=", 1.2),  # or a profile of both sides showing the same forward pass
    "stream_peak_rss_gb": ("<=", None),  # the loader's buffer + 1 GB, known only once measured
    "collect_ceiling_tokens_per_s_d576": ("report", None),  # collect with the null model: its own work only
    "collect_ceiling_tokens_per_s_d2304": ("report", None),
    "collect_ceiling_vs_disk": (">=", 0.5),  # the d-576 ceiling's bytes/s over a raw sequential write's
    "collect_ceiling_multi_hook": (">=", 0.8),  # 8 hooks of d 576 over one, in bytes/s
    "store_write_vs_disk": ("report", None),  # the store writer alone over the same raw write
}
HOOK = "bench"


@dataclass
class BenchConfig:
    out: Path = setting(Path("runs/bench"), "folder for bench.json and the benchmarks' scratch stores")
    device: str = device_setting()
    d_in: int = setting(576, "row width of the reader and training benchmarks (the default model's)")
    width: int = setting(4096, "SAE width of the training benchmarks")
    wide_width: int = setting(16_384, "SAE width of the wide sparsify comparison (train_vs_sparsify_16k)")
    k: int = setting(32, "active latents of the training benchmarks")
    batch_size: int = setting(4096, "rows per training step")
    rounds: int = setting(3, "rounds per side, alternating the sides")
    train_steps: int = 5  # timed steps per round
    read_rows: int = 262_144  # rows of the read benchmark's store (d_in fp16 each)
    read_passes: int = 4  # passes over those rows per round and side (a pass alone is too short to time)
    model: str = setting(DEFAULT_MODEL, "host model of the collect benchmark")
    collect_hook: str = setting(DEFAULT_HOOK, "hook of the collect benchmark", flag="--hook")
    # Enough forward passes per side that the store's creation and the last block's write, which do not
    # overlap the forward, stay a small share of the side's time.
    collect_contexts: int = 128
    collect_batch: int = 16
    context_size: int = 128
    ceiling_tokens: int = setting(524_288, "tokens of each collect_ceiling collect (d 2304: a quarter)")
    stream_chunk_rows: int = 8192  # the store chunk of the streaming benchmark (the loader reads 8 at a time)
    only: str = setting("", "comma-separated keys to measure", shown_default="all")
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def keys(self) -> tuple[str, ...]:
        """The benchmarks asked for (--only), every one when none is named."""
        named = tuple(key.strip() for key in self.only.split(",") if key.strip())
        return named or KEYS

    def wants(self, key: str) -> bool:
        return key in self.keys

    def check(self) -> None:
        """Refuse, before any benchmark runs, settings that would stop one part-way."""
        unknown = sorted(set(self.keys) - set(KEYS))
        if unknown:
            raise SaepipeError(f"--only: unknown benchmark {', '.join(unknown)}; known: {', '.join(KEYS)}")
        if self.rounds < 1:
            raise SaepipeError(f"--rounds must be at least 1, got {self.rounds}")
        if self.wants("collect_vs_saelens") and _saelens_layer(self.collect_hook) is None:
            raise SaepipeError(
                f"collect_vs_saelens maps only blocks.N.hook_resid_post onto SAELens's HF hooks, "
                f"not {self.collect_hook}: pass --hook blocks.15.hook_resid_post or leave this key out"
            )


def _saelens_layer(hook: str) -> int | None:
    """The block whose output `hook` is, when SAELens's HF hooks can reach it (blocks.N.hook_resid_post)."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    return None if match is None else int(match.group(1))


# -- read_vs_memmap ---------------------------------------------------------------------------------
def bench_read(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    """On the CPU whatever `device` is: the reader's own speed."""
    rows = _random_rows(cfg, np.random.default_rng(0))
    store_path = write_array_store(
        _fresh(workdir / "read.zarr"),
        rows,
        rows[: cfg.batch_size],
        hook=HOOK,
        chunk_rows=8192,
        shard_chunks=DEFAULT_SHARD_CHUNKS,  # the layout a collect writes
    )
    raw_path = workdir / "read.raw"
    rows.tofile(raw_path)
    del rows
    store = open_store(store_path)
    n_batches = cfg.read_rows // cfg.batch_size
    memmap = np.memmap(raw_path, np.float16, "r", shape=(cfg.read_rows, cfg.d_in))

    def memmap_side() -> float:
        started = time.perf_counter()
        for _ in range(cfg.read_passes):
            for i in range(n_batches):
                batch = torch.from_numpy(np.array(memmap[i * cfg.batch_size : (i + 1) * cfg.batch_size]))
        del batch
        return cfg.read_passes * n_batches * cfg.batch_size / (time.perf_counter() - started)

    # Steady state, as in training: one streaming loader for the whole benchmark (its reader thread and
    # window buffers start once), each round serving an epoch's worth of batches from it.
    loader = ShuffledBatches(
        store, HOOK, cfg.batch_size, device=torch.device("cpu"), dtype=torch.float16, resident=False
    )
    batches = loader.batches(0)

    def store_side() -> float:
        started = time.perf_counter()
        for _ in range(cfg.read_passes * loader.batches_per_epoch):
            next(batches)
        return cfg.read_passes * loader.batches_per_epoch * cfg.batch_size / (time.perf_counter() - started)

    try:
        memmap_side(), store_side()  # warm the page cache for both
        rates = alternate({"store_tokens_per_s": store_side, "memmap_tokens_per_s": memmap_side}, cfg.rounds)
    finally:
        batches.close()
    return {
        "read_vs_memmap": ratio(rates, "store_tokens_per_s", "memmap_tokens_per_s"),
        "read": {
            "rows": cfg.read_rows,
            "bytes": cfg.read_rows * cfg.d_in * 2,
            "passes_per_round": cfg.read_passes,
            **rates,
        },
    }


def _alone(make: Callable[[], Iterator[torch.Tensor]], batches: int, passes: int, rows: int) -> Callable[[], float]:
    """A side that starts its own iterator, serves a warm-up pass of `batches` (its reader thread starts,
    the page cache fills), times `passes` passes and stops it: no side's read-ahead runs during another's.
    Returns rows per second."""

    def timed() -> float:
        served = make()
        try:
            for _ in range(batches):
                next(served)
            started = time.perf_counter()
            for _ in range(passes * batches):
                next(served)
            return passes * batches * rows / (time.perf_counter() - started)
        finally:
            served.close()

    return timed


def _random_rows(cfg: BenchConfig, rng: np.random.Generator) -> np.ndarray:
    """cfg.read_rows random fp16 rows of width d_in: what the read benchmarks read."""
    return rng.standard_normal((cfg.read_rows, cfg.d_in), dtype=np.float32).astype(np.float16)


def _random_store(cfg: BenchConfig, path: Path, hooks: tuple[str, ...]) -> Path:
    """A store of cfg.read_rows random fp16 rows of width d_in at each hook."""
    rng = np.random.default_rng(0)
    rows = {h: _random_rows(cfg, rng) for h in hooks}
    return write_array_store(_fresh(path), rows, {h: r[: cfg.batch_size] for h, r in rows.items()}, chunk_rows=8192)


def bench_api_read(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    """The public API's batches over the training loader's, both streaming fp16 on the CPU from one store,
    each side alone in its rounds (_alone)."""
    store_path = _random_store(cfg, workdir / "api-read.zarr", (HOOK,))
    loader = ShuffledBatches(
        open_store(store_path), HOOK, cfg.batch_size, device=torch.device("cpu"), dtype=torch.float16, resident=False
    )
    per_pass = loader.batches_per_epoch
    public = api.open_store(store_path).batches(HOOK, cfg.batch_size, dtype=torch.float16, resident=False)
    rates = alternate(
        {
            "loader_tokens_per_s": _alone(lambda: loader.batches(0), per_pass, cfg.read_passes, cfg.batch_size),
            "api_tokens_per_s": _alone(lambda: iter(public), per_pass, cfg.read_passes, cfg.batch_size),
        },
        cfg.rounds,
    )
    return {
        "api_read_vs_loader": ratio(rates, "api_tokens_per_s", "loader_tokens_per_s"),
        "api_read": {"rows": cfg.read_rows, "passes_per_round": cfg.read_passes, **rates},
    }


def bench_two_hooks_read(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    """Bytes per second of a transcoder's batches, two hooks' row-aligned batches (RowAlignedBatches), over
    one hook's (ShuffledBatches), from one store of two d_in-wide hooks; streaming fp16 on the CPU."""
    hooks = (HOOK, f"{HOOK}_out")
    store = open_store(_random_store(cfg, workdir / "two-hooks.zarr", hooks))
    common = dict(device=torch.device("cpu"), dtype=torch.float16, resident=False)
    one = ShuffledBatches(store, HOOK, cfg.batch_size, **common)
    two = RowAlignedBatches(store, hooks, cfg.batch_size, **common)
    per_pass = one.batches_per_epoch
    row_bytes = cfg.d_in * 2
    rates = alternate(
        {
            "one_hook_bytes_per_s": _alone(
                lambda: one.batches(0), per_pass, cfg.read_passes, cfg.batch_size * row_bytes
            ),
            "two_hooks_bytes_per_s": _alone(
                lambda: two.batches(0), per_pass, cfg.read_passes, cfg.batch_size * 2 * row_bytes
            ),
        },
        cfg.rounds,
    )
    return {
        "two_hooks_read_vs_one": ratio(rates, "two_hooks_bytes_per_s", "one_hook_bytes_per_s"),
        "two_hooks_read": {"rows": cfg.read_rows, "passes_per_round": cfg.read_passes, **rates},
    }


def _fresh(path: Path) -> Path:
    """A scratch store's path, cleared of an earlier run's store."""
    shutil.rmtree(path, ignore_errors=True)
    return path


# -- training steps ---------------------------------------------------------------------------------
def _random_batches(cfg: BenchConfig, device: torch.device, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(cfg.batch_size, cfg.d_in, generator=gen).to(device) for _ in range(n)]


def _our_stepper(cfg: BenchConfig, arch: str, store_path: Path, out: Path, device: torch.device):
    """Our training loop's step (stages.train.loop.TrainingRun.step) on in-memory batches."""
    train_cfg = TrainConfig.from_flat(
        store=str(store_path),
        out=str(out),
        hook=HOOK,
        arch=arch,
        width=cfg.width,
        k=cfg.k,
        tokens=cfg.batch_size * 10_000,
        batch_size=cfg.batch_size,
        device=str(device),
        overwrite=True,
        progress=False,
    ).validate()
    run = fresh_training_run(train_cfg, open_store(store_path), device)
    autocast = contextlib.nullcontext()
    return lambda x, step: run.step(x, step, autocast)


def fresh_training_run(cfg: TrainConfig, store: ActivationStore, device: torch.device) -> TrainingRun:
    """A TrainingRun of `cfg` in one process, in a cleared run folder: its steps, taken on batches of the
    caller's, are what a benchmark times."""
    run_dir.prepare(Path(cfg.out), overwrite=True, resume=False)
    return TrainingRun(cfg, store, device, resuming=False, world=World())


def _saelens_stepper(cfg: BenchConfig, arch: str, device: torch.device):
    """SAELens's trainer step (SAETrainer._train_step: forward, backward, grad clipping, Adam, scheduler,
    dead-latent bookkeeping) for its TopK or matching-pursuit training SAE."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = saelens_training_sae(arch, cfg.d_in, cfg.width, cfg.k, str(device))
    lr = TrainConfig(store="", out="", width=cfg.width).resolved_lr()
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=cfg.batch_size * 10_000,
            lr=lr,
            lr_end=lr,
            train_batch_size_samples=cfg.batch_size,
            device=str(device),
        ),
        sae,
        iter(()),
    )
    return lambda x, step: trainer._train_step(sae, x), sae


def _sparsify_stepper(cfg: BenchConfig, device: torch.device):
    """sparsify's Trainer step for a TopK autoencoder (sparsify/trainer.py, fit), on our batches: the
    decoder renormalized before the forward, b_dec set to the first batch's mean, the fvu loss (its
    default; AuxK off, as its auxk_alpha 0 leaves it), the gradient's part parallel to the decoder rows
    removed, its default optimizer (schedule-free SignSGD, momentum 0.95), the dead-latent counters.
    Its encoder (FusedEncoder) is plain PyTorch; its decoder is Triton's kernel on CUDA when triton is
    installed, else torch's embedding_bag (`sparsify_decoder` in bench.json says which ran)."""
    from benchmarks.quality_transcoder import import_sparsify, sparsify_default_lr

    sparsify = import_sparsify()
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    width = cfg.width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        coder = sparsify.SparseCoder(
            cfg.d_in, sparsify.SparseCoderConfig(num_latents=width, k=cfg.k), device, dtype=torch.float32
        )
    optimizer = ScheduleFreeWrapper(
        SignSGD([dict(params=coder.parameters(), lr=sparsify_default_lr(width))]), momentum=0.95
    )
    optimizer.train()
    tokens_since_fired = torch.zeros(width, dtype=torch.long, device=device)
    did_fire = torch.zeros(width, dtype=torch.bool, device=device)

    def step(x: torch.Tensor, i: int) -> None:
        if i == 0:
            coder.b_dec.data = x.mean(0)
        coder.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = coder(x=x, y=x, dead_mask=tokens_since_fired > 10_000_000, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + out.multi_topk_fvu / 8).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    return step


class _TimedSteps:
    """A training step function and the count of steps it has taken (its step index goes on across rounds)."""

    def __init__(self, step: Callable, batches: list[torch.Tensor], device: torch.device):
        self.step, self.batches, self.device, self.taken = step, batches, device, 0

    def rate(self, n: int) -> float:
        """Tokens/s over n steps."""
        synchronize(self.device)
        started = time.perf_counter()
        for i in range(n):
            self.step(self.batches[i % len(self.batches)], self.taken + i)
        synchronize(self.device)
        self.taken += n
        return n * self.batches[0].shape[0] / (time.perf_counter() - started)


def _compare_steps(
    cfg: BenchConfig,
    ours: Callable,
    theirs: Callable,
    batches: list[torch.Tensor],
    device: torch.device,
    steps: int,
    warmup: int,
    them: str = "saelens",
) -> dict[str, list[float]]:
    """Our step against another library's (`them`), after `warmup` untimed steps each, alternating rounds
    of `steps`."""
    sides = {
        "ours_tokens_per_s": _TimedSteps(ours, batches, device),
        f"{them}_tokens_per_s": _TimedSteps(theirs, batches, device),
    }
    for side in sides.values():
        side.rate(warmup)
    return alternate({name: (lambda side=side: side.rate(steps)) for name, side in sides.items()}, cfg.rounds)


def _bench_store(cfg: BenchConfig, workdir: Path) -> Path:
    """A small store of d_in-wide rows: TrainingRun reads its init sample (b_dec, loss scale) from one."""
    path = workdir / "init.zarr"
    if not path.exists():
        rows = np.random.default_rng(2).standard_normal((16_384, cfg.d_in), dtype=np.float32)
        write_array_store(path, rows, rows[: cfg.batch_size], hook=HOOK)
    return path


def matmul_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Dense [m, k] @ [k, n] FLOP/s: the best of repeated timed calls."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def topk_step_flops(batch: int, d_in: int, width: int, k: int) -> int:
    """Encoder forward and encoder weight gradient (dense GEMMs), sparse decoder forward, its gradient
    for the codes and for the decoder rows (k rows per token)."""
    return 2 * 2 * batch * d_in * width + 3 * 2 * batch * k * d_in


def bench_train(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    store = _bench_store(cfg, workdir)
    batches = _random_batches(cfg, device)
    ours = _our_stepper(cfg, "topk", store, workdir / "ours-topk", device)
    theirs, _ = _saelens_stepper(cfg, "topk", device)
    rates = _compare_steps(cfg, ours, theirs, batches, device, steps=cfg.train_steps, warmup=2)
    flops = topk_step_flops(cfg.batch_size, cfg.d_in, cfg.width, cfg.k)
    peak = max(
        matmul_rate(cfg.batch_size, cfg.d_in, cfg.width, device, torch.float32),
        matmul_rate(cfg.d_in, cfg.batch_size, cfg.width, device, torch.float32),
    )
    achieved = statistics.median(rates["ours_tokens_per_s"]) / cfg.batch_size * flops
    return {
        "train_vs_saelens": ratio(rates, "ours_tokens_per_s", "saelens_tokens_per_s"),
        "train_roofline_fraction": achieved / peak,
        "train": {
            **rates,
            "step_flops": flops,
            "achieved_flop_per_s": achieved,
            "matmul_flop_per_s": peak,
            "ours_it_per_s": statistics.median(rates["ours_tokens_per_s"]) / cfg.batch_size,
            "dtype": "float32",
        },
    }


def bench_train_sparsify(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    from benchmarks.quality_transcoder import sparsify_decoder

    store = _bench_store(cfg, workdir)
    batches = _random_batches(cfg, device)
    result: dict = {"sparsify": {"decoder": sparsify_decoder(), "optimizer": "signum (its default)"}}
    for width in dict.fromkeys((cfg.width, cfg.wide_width)):  # once when the two widths are the same
        sized = dataclasses.replace(cfg, width=width)
        ours = _our_stepper(sized, "topk", store, workdir / f"ours-topk-{width}", device)
        theirs = _sparsify_stepper(sized, device)
        rates = _compare_steps(sized, ours, theirs, batches, device, cfg.train_steps, warmup=2, them="sparsify")
        result["sparsify"][f"width_{width}"] = rates
    for key, width in (("train_vs_sparsify", cfg.width), ("train_vs_sparsify_16k", cfg.wide_width)):
        result[key] = ratio(result["sparsify"][f"width_{width}"], "ours_tokens_per_s", "sparsify_tokens_per_s")
    return result


def bench_mp(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    store = _bench_store(cfg, workdir)
    batches = _random_batches(cfg, device)
    ours = _our_stepper(cfg, "mp", store, workdir / "ours-mp", device)
    theirs, their_sae = _saelens_stepper(cfg, "mp", device)
    agreement = _mp_outputs_agree(cfg, their_sae, batches[0], device)
    rates = _compare_steps(cfg, ours, theirs, batches, device, steps=max(1, cfg.train_steps // 2), warmup=1)
    return {
        "mp_vs_saelens": ratio(rates, "ours_tokens_per_s", "saelens_tokens_per_s"),
        "mp": {**rates, "reconstruction_max_rel_diff": agreement},
    }


@torch.no_grad()
def _mp_outputs_agree(cfg: BenchConfig, their_sae, x: torch.Tensor, device: torch.device) -> float:
    """Both implementations given the same dictionary must reconstruct alike (the ratio compares equal
    work): our static pursuit against SAELens's on the same W_dec and b_dec."""
    ours = MatchingPursuitSAE(cfg.d_in, cfg.width, cfg.k).to(device)
    ours.reset_parameters(torch.Generator().manual_seed(3))
    their_sae.W_dec.copy_(ours.W_dec)
    their_sae.b_dec.copy_(ours.b_dec)
    x = x[:512]
    mine, theirs = ours(x), their_sae.decode(their_sae.encode(x))
    diff = float((mine - theirs).norm(dim=-1).max() / x.norm(dim=-1).median())
    if diff > 1e-3:
        raise SaepipeError(
            f"matching pursuit outputs differ from SAELens's ({diff:.2e} relative): "
            f"the speed comparison would not compare equal work"
        )
    return diff


# -- collect ----------------------------------------------------------------------------------------
@dataclass
class _CollectSetup:
    model: object  # the host model, loaded once for every side
    hooks: list[str]
    config: CollectConfig

    def collect_side(self, fsync: bool = True) -> float:
        """Our collect, rows stored per second (store creation and tokenization included); `fsync`:
        each commit flushed to disk (the default), or not (--no-fsync)."""
        started = time.perf_counter()
        run_collect(dataclasses.replace(self.config, fsync=fsync), model=self.model)
        elapsed = time.perf_counter() - started
        return open_store(self.config.out).n_rows("train") / elapsed

    def tokens(self) -> np.ndarray:
        """The collected contexts [n, context_size] (after a first collect_side)."""
        return open_store(self.config.out).tokens[:].astype(np.int64)


def _collect_setup(cfg: BenchConfig, workdir: Path, device: torch.device) -> _CollectSetup:
    model = load_host_model(cfg.model, str(device))
    hooks = validate_hooks(model, [cfg.collect_hook])
    rows_per_context = cfg.context_size - 1
    text = workdir / "collect-text.txt"  # a local file: the corpus is built once, outside the timings
    text.write_text("\n\n".join(_python_docs(cfg.collect_contexts * cfg.context_size * 8)))
    config = CollectConfig(
        model=cfg.model,
        dataset=str(text),
        hooks=(cfg.collect_hook,),
        tokens=cfg.collect_contexts * rows_per_context,
        context_size=cfg.context_size,
        eval_fraction=0.0,
        batch_size=cfg.collect_batch,
        device=str(device),
        out=str(workdir / "collect.zarr"),
        overwrite=True,
        # four blocks, so the writer thread overlaps forward passes as in a long collect
        shuffle_buffer_rows=max(1, cfg.collect_contexts // 4) * rows_per_context,
        warmup_rows=min(65_536, cfg.collect_contexts * rows_per_context // 4),
        progress=False,
    )
    return _CollectSetup(model, hooks, config)


def _collect_sizes(cfg: BenchConfig) -> dict:
    return {
        "model": cfg.model,
        "hook": cfg.collect_hook,
        "contexts": cfg.collect_contexts,
        "context_size": cfg.context_size,
        "batch_size": cfg.collect_batch,
    }


class _StopForward(Exception):
    """Raised from the bare forward's hook once the stop block's output is in hand."""


def _bare_forward(cfg: BenchConfig, model, device: torch.device) -> tuple[str, Callable[[torch.Tensor], None]]:
    """The forward pass collect is measured against, and its name: HF's own model, loaded from the same
    checkpoint with SDPA attention, stopped after the block of the collected hook (as SAELens's runner
    stops), its output copied to the CPU as float32. A model with no HF checkpoint (tiny-random) has the
    bridge's forward pass instead (run_to_hooks)."""
    if model.direct is None:

        def bridge_forward(tokens: torch.Tensor) -> None:
            run_to_hooks(model, tokens, [cfg.collect_hook])[cfg.collect_hook].float().cpu()

        return "transformer-bridge", bridge_forward
    from transformers import AutoModelForCausalLM

    source = str(prepare_default_model()) if cfg.model.lower() == DEFAULT_MODEL else cfg.model
    hf = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", dtype=torch.float32)
    hf = hf.to(device).eval()
    block = hf.get_submodule(_hf_block_name(hf, model.n_layers, hook_layer(cfg.collect_hook)))

    def stop(module, args, output) -> None:
        (output[0] if isinstance(output, tuple) else output).float().cpu()
        raise _StopForward

    block.register_forward_hook(stop)

    def hf_forward(tokens: torch.Tensor) -> None:
        with torch.inference_mode():
            try:
                hf(input_ids=tokens.to(device), use_cache=False)
            except _StopForward:
                pass

    return "hf-sdpa", hf_forward


def bench_collect(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    setup = _collect_setup(cfg, workdir, device)
    setup.collect_side()  # warm-up, and the contexts for the forward side
    tokens = torch.from_numpy(setup.tokens())
    forward_name, forward = _bare_forward(cfg, setup.model, device)

    def forward_side() -> float:
        started = time.perf_counter()
        for i in range(0, len(tokens), cfg.collect_batch):
            forward(tokens[i : i + cfg.collect_batch])
        elapsed = time.perf_counter() - started
        return len(tokens) * (cfg.context_size - 1) / elapsed

    sides = {
        "collect_tokens_per_s": setup.collect_side,
        "collect_no_fsync_tokens_per_s": lambda: setup.collect_side(fsync=False),
        "forward_tokens_per_s": forward_side,
    }
    rates = alternate(sides, cfg.rounds)
    with_fsync = ratio(rates, "collect_tokens_per_s", "forward_tokens_per_s")
    return {
        "collect_vs_forward": with_fsync,
        "fsync_cost": ratio(rates, "collect_no_fsync_tokens_per_s", "forward_tokens_per_s") - with_fsync,
        "collect": {
            **rates,
            **_collect_sizes(cfg),
            "forward": forward_name,
            "collect_forward": setup.model.forward_path(setup.hooks),
        },
    }


def bench_collect_saelens(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    """Our collect against SAELens's CacheActivationsRunner over the same contexts, hook and batch, both
    storing fp16, shuffled, position 0 left out. TransformerLens 3.9 has no SmolLM2 among its
    HookedTransformer models, so SAELens runs the same HF checkpoint through its HookedProxyLM
    (model_class_name AutoModelForCausalLM), hooking the decoder layer whose output is the residual
    stream after that block, and stopping there, as it does for HookedTransformer hooks. Each SAELens
    round builds its runner (and so loads its model) outside the timing; it is given the contexts
    already tokenized, while our side tokenizes and creates its store inside the timing."""
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    cfg.check()
    layer = _saelens_layer(cfg.collect_hook)
    setup = _collect_setup(cfg, workdir, device)
    setup.collect_side()  # warm-up, and the contexts for SAELens
    tokens = setup.tokens()
    rows = len(tokens) * (cfg.context_size - 1)
    model_dir = str(prepare_default_model()) if cfg.model.lower() == DEFAULT_MODEL else cfg.model
    out = workdir / "saelens-cache"
    # Four buffers (shards) of whole model batches, as our collect writes four blocks; half a row more
    # than needed, because SAELens turns the size in GB back into tokens by flooring.
    row_bytes = int(setup.model.d_model) * 2
    buffer_rows = max(1, cfg.collect_contexts // 4 // cfg.collect_batch) * cfg.collect_batch * (cfg.context_size - 1)
    buffer_bytes = buffer_rows * row_bytes + row_bytes // 2

    def saelens_side() -> float:
        shutil.rmtree(out, ignore_errors=True)
        runner_cfg = CacheActivationsRunnerConfig(
            dataset_path="saepipe-bench",
            model_name=model_dir,
            model_class_name="AutoModelForCausalLM",
            hook_name=_hf_block_name(setup.model.bridge.original_model, setup.model.n_layers, layer),
            d_in=int(setup.model.d_model),
            training_tokens=rows,
            context_size=cfg.context_size,
            seqpos_slice=(1, None),
            prepend_bos=False,
            model_batch_size=cfg.collect_batch,
            dtype="float16",
            device=str(device),
            shuffle=True,
            new_cached_activations_path=str(out),
            buffer_size_gb=buffer_bytes / 1e9,
        )
        runner = CacheActivationsRunner(runner_cfg, override_dataset=Dataset.from_dict({"input_ids": tokens.tolist()}))
        started = time.perf_counter()
        cached = runner.run()
        elapsed = time.perf_counter() - started
        return len(cached) * (cfg.context_size - 1) / elapsed

    rates = alternate({"collect_tokens_per_s": setup.collect_side, "saelens_tokens_per_s": saelens_side}, cfg.rounds)
    # What each side spends its time on: one more, untimed, round of each under the profiler.
    profile = {"collect": op_profile(setup.collect_side), "saelens": op_profile(saelens_side)}
    return {
        "collect_vs_saelens": ratio(rates, "collect_tokens_per_s", "saelens_tokens_per_s"),
        "collect_saelens": {
            **rates,
            **_collect_sizes(cfg),
            "saelens_model_class": "AutoModelForCausalLM",
            "collect_forward": setup.model.forward_path(setup.hooks),
            "profile": profile,
        },
    }


def op_profile(side: Callable[[], object], top: int = 15) -> dict:
    """A run of `side` under torch.profiler: its wall time, the self time of every torch op it ran (all
    threads) summed, and the `top` ops by self time with their calls. The wall time less the ops' time is
    what the side spent outside torch's ops (Python, tokenizing, file writes, waiting)."""
    from torch.profiler import ProfilerActivity, profile

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side()
    wall = time.perf_counter() - started
    ops = sorted(prof.key_averages(), key=lambda op: -op.self_cpu_time_total)
    in_ops = sum(op.self_cpu_time_total for op in ops) / 1e6
    return {
        "wall_s": wall,
        "torch_ops_s": in_ops,
        "outside_torch_ops_s": wall - in_ops,
        "top_ops": {op.key: {"calls": op.count, "self_s": op.self_cpu_time_total / 1e6} for op in ops[:top]},
    }


def _hf_block_name(hf_model: torch.nn.Module, n_layers: int, layer: int) -> str:
    """The HF module name of block `layer` (whose output is that block's hook_resid_post): the entry of
    the model's list of decoder blocks, e.g. model.layers.15 (Llama) or transformer.h.15 (GPT-2)."""
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return f"{name}.{layer}"
    raise SaepipeError(f"no list of {n_layers} decoder blocks in {type(hf_model).__name__}")


def _python_docs(characters: int) -> list[str]:
    docs, total = [], 0
    for doc in open_text_source("python-docs").documents():
        docs.append(doc)
        total += len(doc)
        if total >= characters:
            break
    return docs


# -- streaming memory -------------------------------------------------------------------------------
def train_for_peak_rss(args: dict) -> dict:
    """In a fresh process (run_in_child): train with these TrainConfig fields; the peak RSS."""
    run_train(TrainConfig.from_flat(**args))
    return {"peak_rss_bytes": peak_rss_bytes()}


def bench_stream_rss(cfg: BenchConfig, workdir: Path, device: torch.device) -> dict:
    """Train (in a fresh process, on the CPU: host memory is what is measured) from a store four times
    the streaming loader's buffer; its peak RSS."""
    chunk_rows = cfg.stream_chunk_rows
    buffer_bytes = ShuffledBatches.buffer_bytes_for(chunk_rows, cfg.d_in)
    n_rows = 4 * buffer_bytes // (cfg.d_in * 2)
    path = workdir / "stream.zarr"
    gen = np.random.default_rng(4)
    rows = np.empty((n_rows, cfg.d_in), np.float16)
    for i in range(0, n_rows, 65_536):
        rows[i : i + 65_536] = gen.standard_normal((min(65_536, n_rows - i), cfg.d_in), dtype=np.float32)
    write_array_store(
        _fresh(path), rows, rows[: cfg.batch_size], hook=HOOK, chunk_rows=chunk_rows, shard_chunks=DEFAULT_SHARD_CHUNKS
    )
    store_bytes = n_rows * cfg.d_in * 2
    del rows
    assert open_store(path).n_rows("train") == n_rows
    train = {
        "store": str(path),
        "out": str(workdir / "stream-run"),
        "hook": HOOK,
        "width": cfg.width,
        "k": cfg.k,
        "batch_size": cfg.batch_size,
        "tokens": n_rows,
        "resident": False,
        "overwrite": True,
        "progress": False,
        "device": "cpu",
    }
    peak = run_in_child(f"{__name__}.train_for_peak_rss", train, "the streaming-memory benchmark's training")[
        "peak_rss_bytes"
    ]
    return {
        "stream_peak_rss_gb": peak / 1e9,
        "stream": {
            "store_bytes": store_bytes,
            "buffer_bytes": buffer_bytes,
            "peak_rss_bytes": peak,
            "limit_gb": buffer_bytes / 1e9 + 1.0,
        },
    }


# -- the whole run ----------------------------------------------------------------------------------
# Each key's benchmark (bench_train also yields train_roofline_fraction, bench_train_sparsify
# train_vs_sparsify_16k), run in this order.
BENCHMARKS: dict[str, Callable[[BenchConfig, Path, torch.device], dict]] = {
    "read_vs_memmap": bench_read,
    "api_read_vs_loader": bench_api_read,
    "two_hooks_read_vs_one": bench_two_hooks_read,
    "train_vs_saelens": bench_train,
    "train_vs_sparsify": bench_train_sparsify,
    "mp_vs_saelens": bench_mp,
    "collect_vs_forward": bench_collect,
    "collect_vs_saelens": bench_collect_saelens,
    "stream_peak_rss_gb": bench_stream_rss,
    "collect_ceiling_vs_disk": lambda cfg, workdir, device: bench_collect_ceiling(
        cfg.ceiling_tokens, cfg.rounds, workdir, device
    ),
}
KEYS = tuple(BENCHMARKS)


def run_bench(cfg: BenchConfig) -> dict:
    cfg.check()
    device = resolve_device(cfg.device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    workdir = cfg.out / "work"
    workdir.mkdir(exist_ok=True)
    result: dict = {
        "device": _describe_device(device),
        "versions": _versions(),
        "sizes": {"d_in": cfg.d_in, "width": cfg.width, "k": cfg.k, "batch_size": cfg.batch_size, "rounds": cfg.rounds},
        "date": time.strftime("%Y-%m-%d"),
    }
    parts = {key: (lambda part=part: part(cfg, workdir, device)) for key, part in BENCHMARKS.items() if cfg.wants(key)}
    return run_parts(parts, result, cfg.out / "bench.json", "bench", cfg.progress)


def format_bench_table(result: dict) -> str:
    limits = {"stream_peak_rss_gb": result["stream"]["limit_gb"]} if "stream" in result else {}
    return targets_table(result, TARGETS, limits)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        versions["sae_lens"] = version("sae-lens")
        versions["zarr"] = version("zarr")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return versions
