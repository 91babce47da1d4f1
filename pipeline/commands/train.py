"""`saepipe train`: SAEs from a store's training rows (the model is never loaded); sweeps; --nproc."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.commands.options import option_for, options
from stages.saes import arch_settings, owners
from stages.train import TrainConfig, run_sweep, sweeps


def arch_options(command):
    """Every architecture's settings as options, each saying which architectures take it."""
    for name, field in reversed(arch_settings().items()):
        help_text = f"{field.metadata['help']} (--arch {', '.join(owners(name))})"
        command = option_for(field, help=help_text)(command)
    return command


@click.command()
@click.argument("store")
@options(
    TrainConfig, "hook", "arch", "in_hook", "out_hook", "layers", "activation", hook={"multiple": True, "default": ()}
)
@options(TrainConfig, "width", "tokens", "batch_size", "out", "lr", "max_grad_norm", "dead_window_tokens")
@arch_options
@options(TrainConfig, "device", "seed", "log_every", "checkpoint_every")
@click.option(
    "--sweep",
    "sweep_specs",
    multiple=True,
    metavar="NAME=V1,V2",
    help="train every combination from one pass over the store; --out becomes the sweep folder",
)
@options(TrainConfig, "resume", "overwrite")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="data-parallel processes on this machine (one per GPU; gloo on CPU); see also torchrun",
)
@options(TrainConfig, "wandb", "wandb_run", "progress")
def train(store: str, sweep_specs: tuple[str, ...], nproc: int, **values) -> None:
    """Train an SAE on a store's training rows (the model is never loaded)."""
    hooks = values.pop("hook")  # one hook, or a crosscoder's several
    values |= {"hook": hooks[0], "hooks": ()} if len(hooks) == 1 else {"hook": None, "hooks": tuple(hooks)}
    cfg = TrainConfig.from_flat(store=store, **values)
    axes = sweeps.parse_axes(list(sweep_specs))
    outs = run_sweep(sweeps.expand(cfg, axes) if axes else [cfg], nproc)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: rank 0 alone reports
        return
    if not axes:
        click.echo(f"run ready: {outs[0]}")
        return
    summary = sweeps.write_summary(Path(cfg.out), axes, outs)
    click.echo(sweeps.format_summary(summary))
    click.echo(f"sweep ready: {cfg.out} ({len(outs)} runs, summary in sweep.json)")
