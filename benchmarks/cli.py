"""The measurement harnesses' command line: `python -m benchmarks COMMAND` (what `make bench`, `make
gpu-check`, `make scale`, `make soak` and the quality comparisons run; docs/benchmarks.md).

Not part of the installed package: the wheel ships saepipe's own commands only. The same error handling
as `saepipe`'s (one `error:` line, exit 2).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from benchmarks.bench import BenchConfig, format_bench_table, run_bench
from benchmarks.gpu_check import GpuCheckConfig, format_gpu_check, run_gpu_check
from benchmarks.quality import QualityConfig, compare_with_saelens, format_quality_table
from benchmarks.quality_transcoder import TranscoderQualityConfig, compare_with_sparsify, format_table
from benchmarks.scale import ScaleConfig, format_scale_table, run_scale
from benchmarks.soak import SoakConfig, run_soak
from pipeline.cli import SaepipeGroup
from pipeline.commands.options import options
from stages import __version__
from stages.basics.errors import SaepipeError
from stages.train import TrainConfig


@click.group(cls=SaepipeGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="benchmarks")
def main() -> None:
    """saepipe's measurements: speed ratios, the GPU check, quality against SAELens and sparsify, scale, soak."""


@main.command()
@options(BenchConfig, "out", "device", "only", "d_in", "width", "wide_width", "k", "batch_size", "rounds")
@options(BenchConfig, "model", "collect_hook", "ceiling_tokens")
@options(BenchConfig, "progress")
def bench(**values) -> None:
    """Measure speed as same-run ratios (reader, training, matching pursuit, collect, memory); writes
    OUT/bench.json. Needs sae-lens for the SAELens comparisons, eai-sparsify for sparsify's."""
    cfg = BenchConfig(**values)
    result = run_bench(cfg)
    click.echo(format_bench_table(result))
    click.echo(f"written: {Path(cfg.out) / 'bench.json'}")


@main.command("gpu-check")
@options(GpuCheckConfig, "out", "device", "model", "model_shape", "only", "budgets", "progress")
def gpu_check(**values) -> None:
    """Run every CUDA path once (collect, every architecture's training, eval, NCCL, the speed ratios)
    and write OUT/gpu.json; --device cpu is a dry run at toy sizes (docs/benchmarks.md)."""
    cfg = GpuCheckConfig(**values)
    result = run_gpu_check(cfg)
    click.echo(format_gpu_check(result))
    click.echo(f"written: {cfg.out / 'gpu.json'}")
    failed = [name for name, record in result["steps"].items() if not record["ok"]]
    if failed:
        raise SaepipeError(
            f"gpu-check: {', '.join(failed)} failed; their errors and tracebacks are in {cfg.out / 'gpu.json'}"
        )


@main.command()
@click.argument("store")
@options(TrainConfig, "hook")
@options(QualityConfig, "archs")
@options(TrainConfig, "width")
@options(QualityConfig, "k")
@options(TrainConfig, "tokens", "batch_size", "lr")
@options(QualityConfig, "eval_tokens", "use_model", "interpretability", "absorption_words", "probe_data")
@options(QualityConfig, "dictionary_learning")
@options(TrainConfig, "out", out={"help": "folder for the runs, quality.json and quality.md"})
@options(TrainConfig, "device", "seed", "progress")
def quality(store: str, archs: str, k: int, **settings) -> None:
    """Train ours and SAELens's SAEs on the same rows and compare them (needs sae-lens)."""
    names = {field.name for field in dataclasses.fields(QualityConfig)}
    own = {name: settings.pop(name) for name in list(settings) if name in names}
    base = TrainConfig(store=store, **settings)
    rows = compare_with_saelens(base, QualityConfig(archs=archs, k=k, **own))
    click.echo(format_quality_table(rows))


@main.command("quality-transcoder")
@click.argument("store")
@options(TrainConfig, "in_hook", "out_hook", "width")
@options(TranscoderQualityConfig, "k", "skip")
@options(TrainConfig, "tokens", "batch_size", "lr")
@options(TranscoderQualityConfig, "sparsify_lr", "eval_tokens", "use_model")
@options(TrainConfig, "out", out={"help": "folder for both transcoders, quality_transcoder.json and .md"})
@options(TrainConfig, "device", "seed", "progress")
def quality_transcoder(
    store: str, k: int, skip: bool, sparsify_lr: float | None, eval_tokens: int, use_model: bool, **train
) -> None:
    """Train our transcoder and sparsify's (its transcode mode) on the same rows and compare them (needs
    eai-sparsify). --lr is ours; sparsify trains with its own optimizer and lr (--sparsify-lr)."""
    base = TrainConfig(store=store, arch="transcoder", **train)
    qcfg = TranscoderQualityConfig(
        k=k, skip=skip, sparsify_lr=sparsify_lr, eval_tokens=eval_tokens, use_model=use_model
    )
    click.echo(format_table(compare_with_sparsify(base, qcfg)))


@main.command()
@options(ScaleConfig, "out", "collect_tokens", "big_store_gb", "s3_latency_ms", "model", "collect_hook", "only")
@options(ScaleConfig, "progress")
def scale(**values) -> None:
    """Measure collect at 10M and 100M tokens, a store bigger than memory, streaming from S3 (moto, with
    injected latency) and the cost of durable commits; writes OUT/scale.json. Needs about 40 GB of free
    disk under OUT and takes about 12 minutes on 2 cores (docs/scale.md)."""
    cfg = ScaleConfig(**values)
    result = run_scale(cfg)
    click.echo(format_scale_table(result))
    click.echo(f"written: {Path(cfg.out) / 'scale.json'}")


@main.command()
@options(SoakConfig, "out", "seconds", "model", "readers")
def soak(**values) -> None:
    """Train from a store while other processes read it and one appends to it; report throughput and
    whether every reader saw consistent data (a benchmark; writes OUT/soak.json)."""
    cfg = SoakConfig(**values)
    report = run_soak(cfg)
    click.echo(json.dumps(report, indent=2))
    if not report["consistent"]:
        raise SaepipeError(f"the soak found inconsistent data or a damaged store: see {Path(cfg.out) / 'soak.json'}")
