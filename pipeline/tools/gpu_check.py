"""`saepipe gpu-check` (`make gpu-check`): every CUDA path of saepipe run once, in a few minutes on one GPU, into one JSON file.

A researcher's first GPU run should not be the first time these lines run. Each step below runs on its
own: one that fails is recorded (its error and traceback) and the next still runs, so one lease of a GPU
shows every break at once. OUT/gpu.json is rewritten after each step.

Steps:
- environment: torch, CUDA, the device's name, memory and bf16 support.
- collect: the host model over the python-docs text to a store of five hooks (two layers' MLP input and
  output, a residual stream), timed; then the forward pass to those hooks timed through HF's own
  modules and through the bridge (forward_rates).
- train: every architecture, resident and streaming, a few steps each (bf16 autocast on CUDA), from
  that store: SAEs on the residual stream, transcoders, a crosscoder and a CLT on the MLP hooks.
- eval: the TopK run with CE/KL (the SAE spliced into the model).
- nccl: the TopK run again through torch's launcher with one process: the NCCL process group on CUDA
  (gloo on a CPU), DistributedDataParallel, the rank-aware loader.
- bench_d768 / bench_d2304: `make bench`'s training ratios (ours over SAELens, over sparsify, matching
  pursuit over SAELens's) at d 768 / width 16k / k 32 and at d 2304 / width 64k.
- steps_per_s: our TopK step at batch 4,096, d 768, width 16k, k 32 (the bench's own figure), against
  the goal of 1,000 steps/s.

The model: `--model` (the prepared default where it exists), or `--model-shape DIR`, a folder with a
model's config and tokenizer files but no weights (what can travel to a lent GPU machine within its
size limit): the check builds that architecture with random weights, which costs what the real model
costs per token. `--device cpu` runs every step at toy sizes: the dry run that CI and a laptop can do
(tests/pipeline/test_gpu_check.py).

How to run it on a lent GPU machine: docs/benchmarks.md#the-gpu-check.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages import evaluate
from stages.basics import distributed, run_dir
from stages.basics.device import resolve_device, synchronize
from stages.basics.errors import SaepipeError, first_line
from stages.basics.settings import progress_setting, setting
from stages.collect import run_collect
from stages.collect.config import CollectConfig
from stages.host_model.model import run_to_hooks
from stages.train import run_train
from stages.train.config import TrainConfig
from stages.train.loop import run_sweep
from store_schema.reader import open_store

GOAL_STEPS_PER_S = 1000  # TopK at batch 4,096, d 768, width 16k, k 32 on one H100/H200
SAE_ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "mp")


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


GPU_SIZES = Sizes(100_000, 20, 4096, 4096, 32, ((768, 16_384), (2304, 65_536)), 4096, 3)
DRY_SIZES = Sizes(4_000, 3, 256, 128, 8, ((32, 128), (48, 256)), 256, 1)


@dataclass
class GpuCheckConfig:
    out: Path = setting(Path("runs/gpu"), "folder for gpu.json and the check's store and runs")
    device: str = setting("cuda", "cuda, cuda:N, or cpu for a dry run at toy sizes")
    model: str = setting("smollm2-135m", "host model of the collect and eval steps")
    model_shape: str | None = setting(
        None, "a folder with a model's config and tokenizer but no weights: that model with random weights"
    )
    only: str = setting("", "comma-separated steps to run", shown_default="all")
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


def random_weights_model(shape_dir: Path, out: Path) -> Path:
    """A local HF model folder of `shape_dir`'s architecture and tokenizer with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(shape_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out)
    return out


class GpuCheck:
    """The steps, sharing the store, the runs and the result."""

    def __init__(self, cfg: GpuCheckConfig):
        self.cfg, self.sizes = cfg, cfg.sizes
        self.device = resolve_device(cfg.device)
        self.out = cfg.out
        self.store = str(self.out / "store.zarr")
        self.result: dict = {"date": time.strftime("%Y-%m-%d"), "steps": {}}
        self.hooks: dict[str, str] = {}
        self.model_name = ""

    # -- running ------------------------------------------------------------------------------------
    def steps(self) -> dict[str, Callable[[], dict]]:
        return {
            "environment": self.environment,
            "collect": self.collect,
            "train": self.train,
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
        for name, step in self.steps().items():
            if wanted and name not in wanted:
                continue
            if self.cfg.progress:
                print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                record = {"ok": True, **step()}
            except Exception as e:  # noqa: BLE001 - one step's failure is recorded; the next still runs
                record = {"ok": False, "error": first_line(e) or type(e).__name__, "traceback": traceback.format_exc()}
            record["seconds"] = round(time.perf_counter() - started, 1)
            self.result["steps"][name] = record
            self.result["ok"] = all(r["ok"] for r in self.result["steps"].values())
            (self.out / "gpu.json").write_text(json.dumps(self.result, indent=2))
        return self.result

    # -- the steps ----------------------------------------------------------------------------------
    def environment(self) -> dict:
        env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(self.device)}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env |= {
                "cuda": torch.version.cuda,
                "name": props.name,
                "memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
                "nccl": torch.distributed.is_nccl_available(),
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
        mid, resid = model.n_layers // 5, model.n_layers // 2  # 6 and 15 of SmolLM2's 30 layers
        self.hooks = {
            "resid": f"blocks.{resid}.hook_resid_post",
            "in": f"blocks.{mid}.mlp.hook_in",
            "out": f"blocks.{mid}.hook_mlp_out",
            "in_next": f"blocks.{mid + 1}.mlp.hook_in",
            "out_next": f"blocks.{mid + 1}.hook_mlp_out",
        }
        cfg = CollectConfig(
            out=self.store, model=self.model_name, hooks=tuple(self.hooks.values()), tokens=self.sizes.collect_tokens,
            device=str(self.device), overwrite=True, progress=self.cfg.progress, chunk_rows=2048,
            warmup_rows=min(16_384, self.sizes.collect_tokens),
        )  # fmt: skip
        started = time.perf_counter()
        run_collect(cfg, model)
        seconds = time.perf_counter() - started
        hooks = list(self.hooks.values())
        return {
            "model": model.name,
            "hooks": hooks,
            "tokens_per_s": cfg.tokens / seconds,
            "forward": model.forward_path(hooks),
            "forward_tokens_per_s": forward_rates(model, hooks, open_store(self.store).tokens[:64]),
        }

    def _train_config(self, name: str, arch: str, resident: bool) -> TrainConfig:
        s = self.sizes
        base = dict(hook=self.hooks["resid"], k=s.k)
        if arch in ("transcoder", "skip_transcoder"):
            base = dict(hook=None, in_hook=self.hooks["in"], out_hook=self.hooks["out"], k=s.k)
        elif arch == "crosscoder":
            base = dict(hook=None, hooks=(self.hooks["out"], self.hooks["out_next"]), k=s.k)
        elif arch == "clt":
            first = int(self.hooks["in"].split(".")[1])
            base = dict(hook=None, layers=f"{first}-{first + 1}", k=s.k)
        elif arch == "jumprelu":
            base = dict(hook=self.hooks["resid"], target_l0=float(s.k))
        elif arch == "relu":
            base = dict(hook=self.hooks["resid"])
        elif arch == "matryoshka":
            base |= dict(groups=(s.width // 4, s.width))
        return TrainConfig.from_flat(
            store=self.store, out=str(self.out / "runs" / name), arch=arch, width=s.width,
            tokens=s.train_steps * s.batch_size, batch_size=s.batch_size, device=str(self.device),
            resident=resident, overwrite=True, progress=False, **base,
        )  # fmt: skip

    def train(self) -> dict:
        runs, failed = {}, {}
        for arch in (*SAE_ARCHS, "transcoder", "skip_transcoder", "crosscoder", "clt"):
            for resident in (True, False):
                name = f"{arch}-{'resident' if resident else 'streaming'}"
                try:
                    last = run_dir.read_log(run_train(self._train_config(name, arch, resident)))[-1]
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
        cfg = self._train_config("topk-launched", "topk", True)
        started = time.perf_counter()
        [out] = distributed.launch(1, run_sweep, [cfg])
        last = run_dir.read_log(out)[-1]
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        return {"backend": backend, "seconds_with_launch": time.perf_counter() - started, "fve": last["fve"]}

    def bench(self, which: int) -> dict:
        from pipeline.tools.bench import BenchConfig, run_bench

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
    return "\n".join(lines)
