"""`saepipe gpu-check`: every CUDA path once, each step recorded even when another fails."""

from __future__ import annotations

import click

from pipeline.commands.options import options
from pipeline.tools.gpu_check import GpuCheckConfig, format_gpu_check, run_gpu_check
from stages.basics.errors import SaepipeError


@click.command("gpu-check")
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
