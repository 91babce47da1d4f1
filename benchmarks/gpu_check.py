"""`python -m benchmarks gpu-check` (`make gpu-check`): every CUDA path of saepipe run once, in a few minutes on one GPU, into one JSON file.

A researcher's first GPU run should not be the first time these lines run. Each step below runs on its
own: one that fails is recorded (its error and traceback) and the next still runs, so one lease of a GPU
shows every break at once. OUT/gpu.json is rewritten after each step.

Steps, in priority order, each with a time budget on a GPU (STEP_BUDGETS): a step past its budget is cut,
recorded with what it had measured so far, and the next still runs.
- environment: torch, CUDA, the device's name, memory and bf16 support, the packages' versions.
- collect: the host model over the python-docs text to a store of five hooks (two layers' MLP input and
  output, a residual stream), timed; then the forward pass to those hooks timed through HF's own
  modules and through the bridge (forward_rates), and one batch of it profiled.
- collect_speed: collect's own ceiling (the null model, `null-d<N>`, context 1024, one hook) at d 576
  and d 2304; collect at context 1024 against its own forward pass alone (the same model's HF path to
  the same hook), for the model and for a d-2304 model of its family; and the share of a collect's wall
  time the GPU sat idle (torch.profiler's kernel time).
- train_steps: every architecture's training step (bf16 autocast on CUDA) on random batches at d 768 /
  width 16k and d 2304 / width 64k: steps/s and peak memory; the TopK step profiled.
- train_loop: every architecture through the whole training loop, resident and streaming, a few steps
  each, from the collected store: SAEs on the residual stream, transcoders, a crosscoder and a CLT on
  the MLP hooks.
- eval: the TopK run with CE/KL (the SAE spliced into the model).
- nccl: the TopK run again through torch's launcher with one process: the NCCL process group on CUDA
  (gloo on a CPU), DistributedDataParallel, the rank-aware loader.
- bench_d768 / bench_d2304: `make bench`'s training ratios (ours over SAELens, over sparsify, matching
  pursuit over SAELens's) at d 768 / width 16k / k 32 and at d 2304 / width 64k.
- steps_per_s: our TopK step at batch 4,096, d 768, width 16k, k 32 (the bench's own figure), against
  the goal of 1,000 steps/s.

OUT/gpu.json holds the figures; OUT/profile.txt the profiles' summaries (torch.profiler, ops by self time).

The model: `--model` (the prepared default where it exists), or `--model-shape DIR`, a folder with a
model's config and tokenizer files but no weights (what can travel to a lent GPU machine within its
size limit): the check builds that architecture with random weights, which costs what the real model
costs per token. `--device cpu` runs every step at toy sizes: the dry run that CI and a laptop can do
(tests/benchmarks/test_gpu_check.py).

How to run it on a lent GPU machine: docs/benchmarks.md#the-gpu-check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import BenchConfig, fresh_training_run, run_bench
from benchmarks.collect_ceiling import collect_config, collect_rate
from stages import evaluate
from stages.basics import distributed, run_dir
from stages.basics.device import resolve_device, synchronize
from stages.basics.errors import SaepipeError, first_line
from stages.basics.settings import progress_setting, setting
from stages.collect import run_collect
from stages.collect.config import DEFAULT_SHARD_CHUNKS, CollectConfig
from stages.host_model.model import run_to_hooks
from stages.train import run_train
from stages.train.config import TrainConfig
from stages.train.loop import run_sweep
from store_schema.generated import write_array_store
from store_schema.reader import open_store

GOAL_STEPS_PER_S = 1000  # TopK at batch 4,096, d 768, width 16k, k 32 on one H100/H200
SAE_ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "mp")
ALL_ARCHS = (*SAE_ARCHS, "transcoder", "skip_transcoder", "crosscoder", "clt")
# Seconds each step may take on one H100, in priority order; together with the kit's install and Python's
# start they stay under the 8 minutes of a lease's first call (benchmarks/gpu_kit/run.sh). The dry run on a
# CPU keeps them too: its steps take a few seconds each.
STEP_BUDGETS = {
    "environment": 20,
    "collect": 80,
    "collect_speed": 45,
    "train_steps": 100,
    "train_loop": 50,
    "eval": 30,
    "nccl": 35,
    "bench_d768": 40,
    "bench_d2304": 40,
}
PACKAGES = ("torch", "transformers", "numpy", "zarr", "numcodecs", "transformer-lens", "safetensors", "triton",
            "sae-lens", "eai-sparsify")  # fmt: skip


class OverBudget(BaseException):
    """A step ran past its time budget: raised in the main thread by SIGALRM, past any `except Exception`."""


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise OverBudget in the main thread once `seconds` have passed (not at all off the main thread, or
    where SIGALRM does not exist). Native code that never returns is not interrupted: run.sh's outer
    timeout catches that."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not seconds or not usable:
        yield
        return

    def cut(signum, frame):
        raise OverBudget

    previous = signal.signal(signal.SIGALRM, cut)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_budgets(text: str) -> dict[str, float]:
    """STEP_BUDGETS with --budgets' STEP=SECONDS overrides."""
    budgets: dict[str, float] = dict(STEP_BUDGETS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not sep or name not in STEP_BUDGETS or value <= 0:
            raise SaepipeError(
                f"--budgets: {item!r} is not STEP=SECONDS with a known step and a positive number; "
                f"steps: {', '.join(STEP_BUDGETS)}"
            )
        budgets[name] = value
    return budgets


@dataclass(frozen=True)
class Sizes:
    """How big each step is: a GPU's sizes, or the dry run's toy ones."""

    collect_tokens: int
    train_steps: int
    batch_size: int
    width: int
    k: int
    bench: tuple[tuple[int, int], ...]  # (d_in, width) of each bench step
    bench_batch: int
    bench_rounds: int
    ceiling_tokens: int  # of each null-model collect at d 576 (a quarter at d 2304)
    speed_contexts: int  # contexts of 1024 of collect_speed's model collects
    wide_model: int  # the width of collect_speed's wider model of the --model-shape family


GPU_SIZES = Sizes(100_000, 20, 4096, 4096, 32, ((768, 16_384), (2304, 65_536)), 4096, 3, 2**20, 256, 2304)
DRY_SIZES = Sizes(4_000, 3, 256, 128, 8, ((32, 128), (48, 256)), 256, 1, 8 * 1023, 2, 128)


@dataclass
class GpuCheckConfig:
    out: Path = setting(Path("runs/gpu"), "folder for gpu.json and the check's store and runs")
    device: str = setting("cuda", "cuda, cuda:N, or cpu for a dry run at toy sizes")
    model: str = setting("smollm2-135m", "host model of the collect and eval steps")
    model_shape: str | None = setting(
        None, "a folder with a model's config and tokenizer but no weights: that model with random weights"
    )
    only: str = setting("", "comma-separated steps to run", shown_default="all")
    budgets: str = setting(
        "", "comma-separated STEP=SECONDS overriding a step's time budget", shown_default="STEP_BUDGETS"
    )
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def sizes(self) -> Sizes:
        return DRY_SIZES if resolve_device(self.device).type == "cpu" else GPU_SIZES


def forward_rates(model, hooks: list[str], contexts, batch: int = 16, rounds: int = 3) -> dict[str, float]:
    """Tokens/s of the forward pass to `hooks` over `contexts`, through HF's own modules and through the
    bridge (the same model instance, its direct path set aside), alternating, best round of each."""
    tokens = torch.from_numpy(np.asarray(contexts, dtype=np.int64))
    paths = {model.forward_path(hooks): model, "transformer-bridge": dataclasses.replace(model, direct=None)}
    rates = {name: 0.0 for name in paths}
    for _ in range(rounds):
        for name, runner in paths.items():
            synchronize(model.device)
            started = time.perf_counter()
            for i in range(0, len(tokens), batch):
                run_to_hooks(runner, tokens[i : i + batch], hooks)
            synchronize(model.device)
            rates[name] = max(rates[name], tokens.numel() / (time.perf_counter() - started))
    return rates


def random_weights_model(shape_dir: Path, out: Path, **overrides) -> Path:
    """A local HF model folder of `shape_dir`'s architecture and tokenizer with seeded random weights;
    `overrides`: config fields changed (another width of the same family)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(shape_dir, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out)
    return out


def package_versions() -> dict[str, str | None]:
    """The versions of the packages the check runs on (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def nvidia_smi(fields: str) -> str | None:
    """nvidia-smi's answer for the first GPU's `fields` (None where it is missing or fails)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def profile_summary(title: str, device: torch.device, work: Callable[[], None], rows: int = 15) -> str:
    """torch.profiler's table of `work`'s ops by self time on `device` (the CPU's time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        work()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"== {title}\n{prof.key_averages().table(sort_by=sort, row_limit=rows)}\n"


def mlp_and_resid_hooks(mid: int, resid: int) -> dict[str, str]:
    """The check's hooks: layer `mid`'s and the next layer's MLP input and output, a residual stream."""
    return {
        "resid": f"blocks.{resid}.hook_resid_post",
        "in": f"blocks.{mid}.mlp.hook_in",
        "out": f"blocks.{mid}.hook_mlp_out",
        "in_next": f"blocks.{mid + 1}.mlp.hook_in",
        "out_next": f"blocks.{mid + 1}.hook_mlp_out",
    }


class GpuCheck:
    """The steps, sharing the store, the runs and the result."""

    def __init__(self, cfg: GpuCheckConfig):
        self.cfg, self.sizes = cfg, cfg.sizes
        self.device = resolve_device(cfg.device)
        self.out = cfg.out
        self.store = str(self.out / "store.zarr")
        self.budgets = parse_budgets(cfg.budgets)
        self.result: dict = {"date": time.strftime("%Y-%m-%d"), "budgets_s": self.budgets, "steps": {}}
        self.hooks: dict[str, str] = {}
        self.model_name = ""
        # what the running step has measured so far: kept in its record when the step is cut
        self.partial: dict = {}

    # -- running ------------------------------------------------------------------------------------
    def steps(self) -> dict[str, Callable[[], dict]]:
        return {
            "environment": self.environment,
            "collect": self.collect,
            "collect_speed": self.collect_speed,
            "train_steps": self.train_steps,
            "train_loop": self.train_loop,
            "eval": self.eval,
            "nccl": self.nccl,
            "bench_d768": lambda: self.bench(0),
            "bench_d2304": lambda: self.bench(1),
        }

    def run(self) -> dict:
        wanted = {name.strip() for name in self.cfg.only.split(",") if name.strip()}
        unknown = sorted(wanted - set(self.steps()))
        if unknown:
            raise SaepipeError(f"--only: unknown step {', '.join(unknown)}; known: {', '.join(self.steps())}")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "profile.txt").write_text("")
        for name, step in self.steps().items():
            if wanted and name not in wanted:
                continue
            if self.cfg.progress:
                print(f"gpu-check: {name} (budget {self.budgets[name]:g} s) ...", file=sys.stderr, flush=True)
            self.partial = {}
            started = time.perf_counter()
            try:
                with time_budget(self.budgets[name]):
                    record = {"ok": True, **step()}
            except OverBudget:
                record = {
                    "ok": False,
                    "cut": True,
                    "error": f"cut at its budget of {self.budgets[name]:g} s",
                    **self.partial,
                }
            except Exception as e:  # noqa: BLE001 - one step's failure is recorded; the next still runs
                record = {"ok": False, "error": first_line(e) or type(e).__name__, "traceback": traceback.format_exc()}
            record["seconds"] = round(time.perf_counter() - started, 1)
            self.result["steps"][name] = record
            self.result["ok"] = all(r["ok"] for r in self.result["steps"].values())
            (self.out / "gpu.json").write_text(json.dumps(self.result, indent=2))
        return self.result

    def _profile(self, title: str, work: Callable[[], None]) -> None:
        with open(self.out / "profile.txt", "a") as f:
            f.write(profile_summary(title, self.device, work))

    # -- the steps ----------------------------------------------------------------------------------
    def environment(self) -> dict:
        env = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(self.device),
            "packages": package_versions(),
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env |= {
                "cuda": torch.version.cuda,
                "name": props.name,
                "memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
                "nccl": torch.distributed.is_nccl_available(),
                "driver": nvidia_smi("driver_version"),
                "clocks_mhz": nvidia_smi("clocks.max.sm,clocks.max.memory"),
            }
        return env

    def _model(self) -> str:
        if self.cfg.model_shape:
            return str(random_weights_model(Path(self.cfg.model_shape), self.out / "random-weights-model"))
        return self.cfg.model

    def collect(self) -> dict:
        from stages.host_model.loading import load_host_model

        self.model_name = self._model()
        model = load_host_model(self.model_name, str(self.device))
        self.hooks = mlp_and_resid_hooks(model.n_layers // 5, model.n_layers // 2)  # 6 and 15 of SmolLM2's 30
        cfg = CollectConfig(
            out=self.store, model=self.model_name, hooks=tuple(self.hooks.values()), tokens=self.sizes.collect_tokens,
            device=str(self.device), overwrite=True, progress=self.cfg.progress, chunk_rows=2048,
            warmup_rows=min(16_384, self.sizes.collect_tokens),
        )  # fmt: skip
        started = time.perf_counter()
        run_collect(cfg, model)
        seconds = time.perf_counter() - started
        hooks = list(self.hooks.values())
        contexts = open_store(self.store).tokens[:64]
        record = {"model": model.name, "hooks": hooks, "tokens_per_s": cfg.tokens / seconds}
        record["forward"] = model.forward_path(hooks)
        self.partial = dict(record)
        record["forward_tokens_per_s"] = forward_rates(model, hooks, contexts)
        batch = torch.from_numpy(np.asarray(contexts[:16], dtype=np.int64))
        self._profile(
            f"collect's forward pass to {len(hooks)} hooks, 16 contexts", lambda: run_to_hooks(model, batch, hooks)
        )
        return record

    def collect_speed(self) -> dict:
        """Collect's own ceiling, collect against its own forward pass at context 1024, and the GPU's idle
        share during a collect (docs/benchmarks.md#the-gpu-check)."""
        s, record = self.sizes, {}
        hook = "blocks.1.hook_resid_post"
        for width, tokens in ((576, s.ceiling_tokens), (2304, s.ceiling_tokens // 4)):
            cfg = collect_config(self.out / f"ceiling-d{width}.zarr", width, (hook,), tokens, self.device)
            # shards of the d-576 shard's bytes, as `make bench` takes them (benchmarks/collect_ceiling.py)
            cfg = dataclasses.replace(cfg, shard_chunks=max(1, DEFAULT_SHARD_CHUNKS * 576 // width))
            record[f"collect_ceiling_tokens_per_s_d{width}"] = collect_rate(cfg)["tokens_per_s"]
            self.partial = dict(record)
        self.model_name = self.model_name or self._model()
        models = {"model": self.model_name}
        if self.cfg.model_shape:  # a wider model of the same family (on a GPU, Gemma-2-2B's width), two layers
            width = s.wide_model
            heads = max(1, width // 64)
            wide = dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                        num_key_value_heads=3 if heads % 3 == 0 else 1, num_hidden_layers=2)  # fmt: skip
            folder = self.out / f"d{width}-model"
            models[f"d{width}"] = str(random_weights_model(Path(self.cfg.model_shape), folder, **wide))
        for label, name in models.items():
            record[label] = self._collect_against_forward(name)
            self.partial = dict(record)
        return record

    def _collect_against_forward(self, name: str) -> dict:
        """One collect of the model at context 1024 (or its longest) to its middle layer's residual stream,
        against the same forward pass to that hook alone; with CUDA, the share of the collect's wall time
        with no kernel running."""
        from stages.host_model.loading import load_host_model

        model = load_host_model(name, str(self.device))
        hook = f"blocks.{model.n_layers // 2}.hook_resid_post"
        context = min(1024, model.n_ctx)  # the tiny dry-run model holds 256
        tokens = self.sizes.speed_contexts * (context - 1)
        cfg = CollectConfig(
            out=str(self.out / "speed.zarr"), model=name, hooks=(hook,), tokens=tokens, context_size=context,
            dataset="synthetic-text", eval_fraction=0.0, batch_size=16, device=str(self.device), overwrite=True,
            progress=False, warmup_rows=min(16_384, tokens),
        )  # fmt: skip
        collect_rate(cfg, model)  # warm-up: the kernels' first launches, the page cache
        measured = collect_rate(cfg, model, profile=self.device.type == "cuda")
        contexts = open_store(cfg.out).tokens[:]
        forward = forward_rates(model, [hook], contexts, batch=16, rounds=2)[model.forward_path([hook])]
        return {
            "d_model": model.d_model,
            "context_size": context,
            "forward": model.forward_path([hook]),
            "collect_tokens_per_s": measured["tokens_per_s"],
            "forward_tokens_per_s": forward,
            "collect_vs_forward": measured["tokens_per_s"] / forward,
            "gpu_idle_share": measured.get("idle_share"),
        }

    def _train_config(self, store: str, hooks: dict[str, str], name: str, arch: str, **values) -> TrainConfig:
        """A run of `arch` on the hooks of mlp_and_resid_hooks: SAEs on the residual stream, a transcoder
        from an MLP's input to its output, a crosscoder on two MLP outputs, a CLT over the two layers."""
        s = self.sizes
        base = dict(hook=hooks["resid"], k=s.k)
        if arch in ("transcoder", "skip_transcoder"):
            base = dict(hook=None, in_hook=hooks["in"], out_hook=hooks["out"], k=s.k)
        elif arch == "crosscoder":
            base = dict(hook=None, hooks=(hooks["out"], hooks["out_next"]), k=s.k)
        elif arch == "clt":
            first = int(hooks["in"].split(".")[1])
            base = dict(hook=None, layers=f"{first}-{first + 1}", k=s.k)
        elif arch == "jumprelu":
            base = dict(hook=hooks["resid"], target_l0=float(s.k))
        elif arch == "relu":
            base = dict(hook=hooks["resid"])
        elif arch == "matryoshka":
            base |= dict(groups=(values["width"] // 4, values["width"]))
        return TrainConfig.from_flat(
            store=store, out=str(self.out / "runs" / name), arch=arch, batch_size=s.batch_size,
            device=str(self.device), overwrite=True, progress=False, **base, **values,
        )  # fmt: skip

    def train_steps(self) -> dict:
        """Every architecture's training step at the bench's sizes, on random batches already on the device."""
        sizes: dict = {}
        self.partial = {"sizes": sizes}
        failed = {}
        for d_in, width in self.sizes.bench:
            hooks = mlp_and_resid_hooks(0, 0)
            store = self._random_store(d_in, tuple(hooks.values()))
            size = sizes.setdefault(f"d{d_in}_w{width}", {})
            for arch in ALL_ARCHS:
                try:
                    size[arch] = self._time_step(store, hooks, arch, d_in, width)
                except Exception as e:  # noqa: BLE001 - every architecture is tried; the step fails at the end
                    failed[f"{arch} d{d_in} w{width}"] = first_line(e) or type(e).__name__
        if failed:
            raise RuntimeError(f"{len(failed)} step timings failed: {json.dumps(failed)}")
        return {"sizes": sizes, "batch_size": self.sizes.batch_size}

    def _random_store(self, d_in: int, hooks: tuple[str, ...]) -> str:
        """A store of random d_in-wide rows at `hooks`: the initialization sample of train_steps' runs."""
        path = self.out / f"steps-d{d_in}.zarr"
        if not path.exists():
            rng = np.random.default_rng(0)
            rows = {h: rng.standard_normal((self.sizes.batch_size, d_in), dtype=np.float32) for h in hooks}
            write_array_store(path, rows, {h: r[:256] for h, r in rows.items()})
        return str(path)

    def _time_step(self, store: str, hooks: dict[str, str], arch: str, d_in: int, width: int) -> dict:
        """Steps/s of TrainingRun.step (forward, backward, Adam, the architecture's own hooks) and its peak
        memory, after two untimed steps; the TopK step at the first size is profiled too."""
        name = f"step-{arch}-d{d_in}"
        rows = self.sizes.batch_size
        cfg = self._train_config(
            store, hooks, name, arch, width=width, tokens=rows * 10_000, geometric_median_rows=rows
        ).validate()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        run = fresh_training_run(cfg, open_store(store), self.device)
        gen = torch.Generator(self.device).manual_seed(0)
        x = tuple(torch.randn(rows, d_in, generator=gen, device=self.device) for _ in cfg.read_hooks)
        batch = x[0] if len(x) == 1 else x
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        try:
            for i in range(2):
                run.step(batch, i, autocast)
            n = max(3, self.sizes.train_steps // 2)
            synchronize(self.device)
            started = time.perf_counter()
            for i in range(2, 2 + n):
                run.step(batch, i, autocast)
            synchronize(self.device)
            seconds = time.perf_counter() - started
            if arch == "topk" and (d_in, width) == self.sizes.bench[0]:
                self._profile(
                    f"TopK training step x3, d {d_in}, width {width}, batch {rows}",
                    lambda: [run.step(batch, 2 + n + i, autocast) for i in range(3)],
                )
        finally:
            run.close()
        record = {"steps_per_s": n / seconds, "tokens_per_s": n * rows / seconds}
        if cuda:
            record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return record

    def train_loop(self) -> dict:
        s = self.sizes
        runs, failed = {}, {}
        self.partial = {"runs": runs}
        for arch in ALL_ARCHS:
            for resident in (True, False):
                name = f"{arch}-{'resident' if resident else 'streaming'}"
                cfg = self._train_config(
                    self.store, self.hooks, name, arch, width=s.width, tokens=s.train_steps * s.batch_size,
                    resident=resident,
                )  # fmt: skip
                try:
                    last = run_dir.read_log(run_train(cfg))[-1]
                    runs[name] = {"tokens_per_s": last["tokens_per_s"], "fve": last["fve"], "l0": last["l0"]}
                except Exception as e:  # noqa: BLE001 - every architecture is tried; the step fails at the end
                    failed[name] = first_line(e) or type(e).__name__
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(runs) + len(failed)} runs failed: {json.dumps(failed)}")
        return {"runs": runs}

    def eval(self) -> dict:
        run = self.out / "runs" / "topk-resident"
        metrics = evaluate.run_eval(
            evaluate.EvalConfig(str(run), tokens=4096, ablation_contexts=1, device=str(self.device), progress=False)
        )
        return {key: metrics[key] for key in ("fve", "l0", "ce_recovered", "kl", "ablation_sparsity") if key in metrics}

    def nccl(self) -> dict:
        s = self.sizes
        cfg = self._train_config(
            self.store, self.hooks, "topk-launched", "topk", width=s.width, tokens=s.train_steps * s.batch_size,
            resident=True,
        )  # fmt: skip
        started = time.perf_counter()
        [out] = distributed.launch(1, run_sweep, [cfg])
        last = run_dir.read_log(out)[-1]
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        return {"backend": backend, "seconds_with_launch": time.perf_counter() - started, "fve": last["fve"]}

    def bench(self, which: int) -> dict:

        d_in, width = self.sizes.bench[which]
        bench_cfg = BenchConfig(
            out=self.out / f"bench-d{d_in}", device=str(self.device), d_in=d_in, width=width, wide_width=width,
            k=self.sizes.k, batch_size=self.sizes.bench_batch,
            rounds=self.sizes.bench_rounds, only="train_vs_saelens,train_vs_sparsify,mp_vs_saelens",
            progress=False,
        )  # fmt: skip
        result = run_bench(bench_cfg)
        keys = ("train_vs_saelens", "train_roofline_fraction", "train_vs_sparsify", "mp_vs_saelens")
        record = {key: result[key] for key in keys if key in result}
        record["sizes"] = result["sizes"]
        if which == 0:  # the goal is stated at the first size
            record["steps_per_s"] = result["train"]["ours_it_per_s"]
            record["goal_steps_per_s"] = GOAL_STEPS_PER_S
        return record


def run_gpu_check(cfg: GpuCheckConfig) -> dict:
    return GpuCheck(cfg).run()


def format_gpu_check(result: dict) -> str:
    """One line per step: ok or its error, its seconds and its headline figures."""
    lines = []
    for name, record in result["steps"].items():
        figures = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("ok", "seconds")}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
        status = "ok" if record["ok"] else f"FAILED: {record['error']}"
        lines.append(f"{name:<12} {status} ({record['seconds']} s){': ' + shown if shown and record['ok'] else ''}")
        for size, archs in record.get("sizes", {}).items() if name == "train_steps" else ():
            steps = ", ".join(f"{arch} {timing['steps_per_s']:.4g}" for arch, timing in archs.items())
            lines.append(f"{'':<12}   {size} steps/s: {steps}")
    return "\n".join(lines)
